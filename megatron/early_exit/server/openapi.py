"""OpenAPI 3.1 document generated from the pydantic schemas the server validates with.

`docs/openapi.json` is this document, committed (a unit test keeps them equal; regenerate
with `python -m megatron.early_exit.server.openapi > docs/openapi.json`).
"""

from __future__ import annotations

import json
from functools import lru_cache

from pydantic.json_schema import models_json_schema

from megatron.early_exit.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    MegatronRequest,
    MegatronResponse,
)

_REF = "#/components/schemas/{model}"


def _json_body(name: str) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": _REF.format(model=name)}}}}


def _errors(*codes: int) -> dict:
    text = {
        400: "invalid request (malformed JSON, wrong type, out of range, too long, unknown exit)",
        401: "API key missing or wrong (server started with --api-key)",
        413: "body larger than --max-body-bytes",
        415: "body is not application/json",
        500: "generation failed on some rank (message names it); the server keeps serving",
        503: "queue full or shutting down",
        504: "generation timed out",
    }
    return {str(c): {"description": text[c], **_json_body("ErrorResponse")} for c in codes}


@lru_cache(maxsize=1)
def openapi_spec() -> dict:
    models = [
        (MegatronRequest, "validation"),
        (CompletionRequest, "validation"),
        (ChatCompletionRequest, "validation"),
        (MegatronResponse, "serialization"),
        (CompletionResponse, "serialization"),
        (ErrorResponse, "serialization"),
        (HealthResponse, "serialization"),
    ]
    _, defs = models_json_schema(models, ref_template=_REF)
    schemas = defs.get("$defs", {})
    completion_ok = _json_body("CompletionResponse")
    completion_ok["content"]["text/event-stream"] = {
        "schema": {
            "type": "string",
            "description": "stream=true: `data: {chunk}` events (CompletionResponse shape, "
            "one per token with its exit layers), ending with `data: [DONE]`",
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Early-exit GPT generation server",
            "version": "1.0.0",
            "description": "Megatron-LM/EE-LLM compatible `PUT /api` and OpenAI compatible "
            "`POST /v1/completions` with an `early_exit` extension.",
        },
        "paths": {
            "/api": {
                "put": {
                    "summary": "Megatron-LM / EE-LLM text generation",
                    "operationId": "megatronGenerate",
                    "requestBody": {"required": True, **_json_body("MegatronRequest")},
                    "responses": {
                        "200": {"description": "generated text", **_json_body("MegatronResponse")},
                        **_errors(400, 401, 413, 415, 500, 503, 504),
                    },
                }
            },
            "/v1/completions": {
                "post": {
                    "summary": "OpenAI-compatible completions (+ early_exit extension)",
                    "operationId": "createCompletion",
                    "requestBody": {"required": True, **_json_body("CompletionRequest")},
                    "responses": {
                        "200": {"description": "completion", **completion_ok},
                        **_errors(400, 401, 413, 415, 500, 503, 504),
                    },
                }
            },
            "/v1/chat/completions": {
                "post": {
                    "summary": "OpenAI-compatible chat completions (the tokenizer's chat "
                    "template; + early_exit extension)",
                    "operationId": "createChatCompletion",
                    "requestBody": {"required": True, **_json_body("ChatCompletionRequest")},
                    "responses": {
                        "200": {
                            "description": "chat.completion, or chat.completion.chunk SSE "
                            "events with stream=true",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors(400, 401, 413, 415, 500, 503, 504),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "liveness and queue depth",
                    "operationId": "health",
                    "responses": {
                        "200": {"description": "healthy", **_json_body("HealthResponse")},
                        "503": {"description": "degraded", **_json_body("HealthResponse")},
                    },
                }
            },
            "/ready": {
                "get": {
                    "summary": "readiness: live and accepting (503 while shutting down)",
                    "operationId": "ready",
                    "responses": {
                        "200": {"description": "ready", **_json_body("HealthResponse")},
                        "503": {"description": "not ready", **_json_body("HealthResponse")},
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "the served model",
                    "operationId": "listModels",
                    "responses": {
                        "200": {
                            "description": "OpenAI model list",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors(401),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],  # optional: only with --api-key
    }


def openapi_json() -> str:
    return json.dumps(openapi_spec(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(openapi_json(), end="")
