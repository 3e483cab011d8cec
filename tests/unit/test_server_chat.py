"""/v1/chat/completions and /v1/models against the fake engine, with the official client."""

from __future__ import annotations

import json

import pytest

from megatron.early_exit.server import protocol
from megatron.early_exit.server.app import ServerContext, make_server, serve_in_thread
from megatron.early_exit.server.chat import ChatTemplate, load_chat_template
from megatron.early_exit.server.metrics import ServerMetrics
from megatron.early_exit.server.service import GenerationService
from tests.unit.test_server_hardening import call
from tests.unit.test_server_http import EOS, LIMITS, FakeEngine, detokenize, tokenize

pytestmark = pytest.mark.unit

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi é"}]


@pytest.fixture(scope="module")
def port():
    engine = FakeEngine()
    metrics = ServerMetrics()
    service = GenerationService(engine.generate, metrics).start()
    codec = protocol.TextCodec(tokenize, detokenize, LIMITS, bos=1, model_name="fake", eos=EOS)
    ctx = ServerContext(service, codec, metrics, chat_template=ChatTemplate(TEMPLATE, "^", "$"))
    srv = make_server(ctx, "127.0.0.1", 0)
    serve_in_thread(srv)
    yield srv.server_address[1]
    srv.shutdown()
    service.stop()


def _rendered():
    return "^" + "".join(f"<{m['role']}>{m['content']}\n" for m in MESSAGES) + "<assistant>"


def test_chat_equals_completion_of_the_rendered_prompt(port):
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "logprobs": True}
    status, out, _ = call(port, "POST", "/v1/chat/completions", body)
    assert status == 200, out
    ref = call(port, "POST", "/v1/completions",
               {"prompt": _rendered(), "max_tokens": 12, "temperature": 0})[1]  # fmt: skip
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == ref["choices"][0]["text"]
    assert choice["token_ids"] == ref["choices"][0]["token_ids"]
    assert len(choice["logprobs"]["content"]) == len(choice["token_ids"])
    status, raw, _ = call(port, "POST", "/v1/chat/completions", {**body, "stream": True})
    events = [ln[6:] for ln in raw.split("\n") if ln.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == choice["message"]["content"]


def test_openai_client_chat_and_models(port):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["fake"]
    resp = client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=8,
                                          temperature=0)  # fmt: skip
    stream = client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=8,
                                            temperature=0, stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == resp.choices[0].message.content and text
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="fake", messages=[], max_tokens=2)


def test_template_errors_and_missing_template(port, tmp_path):
    bad = {"messages": [{"role": "wizard", "content": "x"}]}
    assert call(port, "POST", "/v1/chat/completions", bad)[0] == 400
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user "
                          "first') }}{% endif %}x")  # fmt: skip
    from megatron.early_exit.errors import InferenceError

    with pytest.raises(InferenceError, match="user first"):
        strict.render(MESSAGES)
    engine = FakeEngine()
    service = GenerationService(engine.generate).start()
    codec = protocol.TextCodec(tokenize, detokenize, LIMITS)
    srv = make_server(ServerContext(service, codec, ServerMetrics()), "127.0.0.1", 0)
    serve_in_thread(srv)
    try:
        status, out, _ = call(srv.server_address[1], "POST", "/v1/chat/completions",
                              {"messages": MESSAGES})  # fmt: skip
        assert status == 400 and "no chat template" in out["error"]["message"]
    finally:
        srv.shutdown()
        service.stop()


def test_load_chat_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_chat_template(str(tmp_path / "tokenizer.json")) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    assert load_chat_template(str(tmp_path)) == TEMPLATE
    listed = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": listed}))
    assert load_chat_template(str(tmp_path / "tokenizer.json")) == "d"
    (tmp_path / "mine.jinja").write_text("m")
    assert load_chat_template(str(tmp_path), str(tmp_path / "mine.jinja")) == "m"
    from megatron.early_exit.errors import ConfigError

    with pytest.raises(ConfigError, match="--chat-template"):
        load_chat_template(None, str(tmp_path / "missing.jinja"))
