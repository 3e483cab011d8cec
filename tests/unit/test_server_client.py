"""tools/request_client.py against the HTTP layer with the fake engine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.unit.test_server_http import server  # noqa: F401  (module fixture)

pytestmark = pytest.mark.unit

_spec = importlib.util.spec_from_file_location(
    "request_client", Path(__file__).resolve().parents[2] / "tools" / "request_client.py"
)
client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(client)


def test_openai_stream_equals_plain(server, capsys, tmp_path):  # noqa: F811
    port, _ = server
    url = f"--url=http://127.0.0.1:{port}"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": "é"}) + "\n")
    common = [url, "--prompts-file", str(prompts), "--max-tokens", "10", "--early-exit",
              "--threshold", "0.5"]  # fmt: skip
    assert client.main([*common, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert client.main([*common, "--stream", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.split("\n") if line.strip()]
    texts = {}
    for ev in events:
        for c in ev["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in sorted(texts)] == [c["text"] for c in plain["choices"]]


def test_megatron_api_and_errors(server, capsys):  # noqa: F811
    port, _ = server
    url = f"--url=http://127.0.0.1:{port}"
    rc = client.main([url, "--api", "megatron", "--prompt", "ab", "--max-tokens", "4",
                      "--early-exit", "--exit-layers", "2", "--print-exits"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("=== [0] ab") and "exit layers:" in out
    rc = client.main([url, "--prompt", "ab", "--exit-layers", "7"])
    assert rc == 1
    assert "exit layer 7 does not exist" in capsys.readouterr().err
