"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template (jinja2).

The template is the `chat_template` of the tokenizer's `tokenizer_config.json` (or a
`chat_template.jinja` beside it), as HF tokenizers ship it (SmolLM2-Instruct has one), or
`--chat-template FILE`. It runs in jinja2's sandbox with HF's conventions (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`). The rendered text is
then a completion prompt: generation, stop handling, streaming and early exit are those of
/v1/completions; only the response shape differs (`message` / `delta`).
"""

from __future__ import annotations

import json
import os
import time
import uuid

from megatron.early_exit.errors import ConfigError, InferenceError
from megatron.early_exit.server.schemas import ChatCompletionRequest, CompletionRequest


def load_chat_template(tokenizer_model: str | None, override: str | None = None) -> str | None:
    """The template text: `override` (a file), else the tokenizer directory's, else None."""
    if override is not None:
        try:
            with open(override, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise ConfigError(f"--chat-template {override!r}: {exc.strerror}") from None
    if not tokenizer_model:
        return None
    folder = tokenizer_model if os.path.isdir(tokenizer_model) else os.path.dirname(tokenizer_model)
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: cannot read chat_template ({exc})") from None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    def __init__(self, source: str, bos: str | None = None, eos: str | None = None) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise InferenceError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"chat template does not compile: {exc}") from None
        self.bos, self.eos = bos or "", eos or ""

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos,
                eos_token=self.eos,
            )
        except TemplateError as exc:
            raise InferenceError(f"chat template failed on these messages: {exc}") from None


def completion_request(req: ChatCompletionRequest, template: ChatTemplate) -> CompletionRequest:
    """The /v1/completions request the chat request amounts to."""
    prompt = template.render([m.plain() for m in req.messages])
    max_tokens = req.max_completion_tokens or req.max_tokens
    return CompletionRequest(
        prompt=prompt,
        model=req.model,
        max_tokens=16 if max_tokens is None else max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stream=req.stream,
        stream_options=req.stream_options,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        stop=req.stop,
        seed=req.seed,
        user=req.user,
        early_exit=req.early_exit,
    )


def chat_response(completion: dict) -> dict:
    """A /v1/completions response as a chat.completion."""
    choices = []
    for c in completion["choices"]:
        choices.append(
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"],
                "logprobs": _chat_logprobs(c.get("logprobs")),
                "exit_layers": c["exit_layers"],
                "token_ids": c["token_ids"],
            }
        )
    return {
        **completion,
        "id": completion["id"].replace("cmpl-", "chatcmpl-", 1),
        "object": "chat.completion",
        "choices": choices,
    }


def _chat_logprobs(block: dict | None) -> dict | None:
    if not block:
        return None
    content = [
        {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
        for t, lp in zip(block["tokens"], block["token_logprobs"])
    ]
    return {"content": content}


class ChatChunks:
    """Turns the completion streamer's SSE events into chat.completion.chunk events."""

    def __init__(self) -> None:
        self.rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.started: set[int] = set()

    def convert(self, event: bytes) -> bytes:
        text = event.decode()
        if not text.startswith("data: ") or text.startswith("data: [DONE]"):
            return event
        body = json.loads(text[6:])
        if "error" in body:
            return event
        choices = []
        for c in body.get("choices", []):
            delta: dict = {}
            if c["index"] not in self.started:
                self.started.add(c["index"])
                delta["role"] = "assistant"
            if c.get("text"):
                delta["content"] = c["text"]
            choice = {"index": c["index"], "delta": delta, "finish_reason": c.get("finish_reason")}
            if c.get("exit_layers") is not None:
                choice["exit_layers"] = c["exit_layers"]
            choice["logprobs"] = _chat_logprobs(c.get("logprobs"))
            choices.append(choice)
        body.update(id=self.rid, object="chat.completion.chunk", created=self.created,
                    choices=choices)  # fmt: skip
        return f"data: {json.dumps(body)}\n\n".encode()
