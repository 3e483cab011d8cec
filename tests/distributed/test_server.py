"""The real generation server: 2 processes, PP=2 on CPU, a tiny checkpoint trained here.

One server is shared by the whole module. References come from the generation CLI
(tools/generate.py) run on the same checkpoint and layout, so the server must give the
same tokens as the engine does outside it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.distributed.launch import ENTRY, ROOT, TINY, free_port, torchrun

pytestmark = pytest.mark.distributed

GENERATE = ROOT / "tools" / "generate.py"
PP2 = ["--pipeline-model-parallel-size", "2"]
# The real entry point with a coordinator hook: a prompt holding this id makes rank 1 raise.
FAULT_WORKER = ROOT / "tests" / "distributed" / "worker_server_fault.py"
FAULT_TOKEN = 123
PROMPTS = ["5 6 7", "10 20 30 40 50"]
# On this barely trained 200-token model, max-prob confidences sit near 1/200; this
# threshold makes tokens exit at layers 1, 3 and the full model (4) in the same request.
THRES = 0.0052
MAX_NEW = 12


def _post(port, method, path, body=None, raw=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read().decode()
    conn.close()
    if "json" in (resp.getheader("Content-Type") or ""):
        return resp.status, json.loads(payload)
    return resp.status, payload


def _cli(ckpt, out, extra):
    torchrun(2, GENERATE, ["--load", str(ckpt), *PP2, "--output-json", str(out), *extra])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    ckpt = tmp / "ckpt"
    torchrun(2, ENTRY, [*TINY, *PP2, "--seq-length", "64", "--exit-layer-nums", "1", "3",
                        "--train-iters", "4", "--save", str(ckpt)])  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(FAULT_WORKER),
           str(FAULT_TOKEN),
           "--load", str(ckpt), *PP2, "--port", str(port), "--dist-timeout", "60"]  # fmt: skip
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    # The CLI references run while the server starts (both are small).
    prompt_args = [a for p in PROMPTS for a in ("--prompt", p)]
    greedy = _cli(ckpt, tmp / "greedy.json", [*prompt_args, "--max-new-tokens", str(MAX_NEW),
                                              "--logprobs"])  # fmt: skip
    early_args = ["--mode", "early_exit", "--threshold", str(THRES), "--temperature", "0.9",
                  "--sampling-seed", "7", "--max-new-tokens", str(MAX_NEW)]  # fmt: skip
    early = _cli(ckpt, tmp / "early.json", [*prompt_args, *early_args])
    deadline = time.time() + 180
    while True:
        try:
            if _post(port, "GET", "/health", raw=b"", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.flush()
            raise AssertionError(
                "server did not start:\n" + (tmp / "server.log").read_text()[-5000:]
            )
        time.sleep(0.5)
    yield {"port": port, "proc": proc, "greedy": greedy, "early": early, "tmp": tmp}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


def test_api_matches_generation_cli(env):
    body = {"prompts": PROMPTS, "tokens_to_generate": MAX_NEW, "temperature": 0.0,
            "logprobs": True}  # fmt: skip
    status, out = _post(env["port"], "PUT", "/api", body)
    assert status == 200, out
    assert out["tokens"] == [r["token_ids"] for r in env["greedy"]]
    for got, ref in zip(out["logprobs"], env["greedy"]):
        assert got == pytest.approx(ref["logprobs"], abs=1e-6)
    body = {"prompts": PROMPTS, "tokens_to_generate": MAX_NEW, "temperature": 0.9, "top_k": 0,
            "random_seed": 7, "use_early_exit": True, "early_exit_thres": THRES,
            "print_max_prob": True}  # fmt: skip
    status, out = _post(env["port"], "PUT", "/api", body)
    assert status == 200, out
    assert out["tokens"] == [r["token_ids"] for r in env["early"]]
    assert out["exit_layers"] == [r["exit_layers"] for r in env["early"]]
    assert len({x for layers in out["exit_layers"] for x in layers}) > 1  # exits really fire


def _stream_text(port, body):
    status, raw = _post(port, "POST", "/v1/completions", {**body, "stream": True})
    assert status == 200, raw
    events = [ln[6:] for ln in raw.split("\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts, layers = {}, {}
    for ev in events[:-1]:
        for c in json.loads(ev)["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            layers.setdefault(c["index"], []).extend(c.get("exit_layers") or [])
    return [texts[i] for i in sorted(texts)], [layers[i] for i in sorted(layers)]


def test_completions_match_cli_and_stream(env):
    body = {"prompt": PROMPTS, "max_tokens": MAX_NEW, "temperature": 0.9, "seed": 7,
            "early_exit": {"mode": "early_exit", "threshold": THRES}}  # fmt: skip
    status, out = _post(env["port"], "POST", "/v1/completions", body)
    assert status == 200, out
    assert [c["token_ids"] for c in out["choices"]] == [r["token_ids"] for r in env["early"]]
    assert [c["exit_layers"] for c in out["choices"]] == [r["exit_layers"] for r in env["early"]]
    assert out["usage"]["completion_tokens"] == sum(len(r["token_ids"]) for r in env["early"])
    texts, layers = _stream_text(env["port"], body)
    assert texts == [c["text"] for c in out["choices"]]
    assert layers == [c["exit_layers"] for c in out["choices"]]


def test_openai_client(env):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{env['port']}/v1", api_key="none")
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_NEW,
                                     temperature=0, logprobs=1)  # fmt: skip
    ref = env["greedy"][0]
    assert resp.choices[0].model_extra["token_ids"] == ref["token_ids"]
    assert resp.choices[0].text == " ".join(map(str, ref["token_ids"]))  # NullTokenizer text
    assert resp.usage.completion_tokens == MAX_NEW
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_NEW,
                                       temperature=0, stream=True,
                                       extra_body={"early_exit": {"mode": "none"}})  # fmt: skip
    assert (
        "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == resp.choices[0].text
    )
    with pytest.raises(openai.BadRequestError, match="exit layer 2 does not exist"):
        client.completions.create(model="tiny", prompt="1 2", max_tokens=2,
                                  extra_body={"early_exit": {"exit_layers": [2]}})  # fmt: skip


@pytest.mark.parametrize(
    "method, path, raw",
    [
        ("PUT", "/api", b"{not json"),
        ("PUT", "/api", b'{"prompts": "5 6"}'),
        ("PUT", "/api", b'{"prompts": ["5 6"], "tokens_to_generate": "3"}'),
        ("PUT", "/api", b'{"prompts": ["5 6"], "early_exit_thres": 40}'),
        ("PUT", "/api", json.dumps({"prompts": [" ".join(["3"] * 70)]}).encode()),
        ("PUT", "/api", b'{"prompts": ["5 6"], "use_early_exit": true, "exit_layers": [2]}'),
        ("PUT", "/api", b'{"prompts": ["not ids"]}'),
        ("POST", "/v1/completions", b'{"prompt": "5", "max_tokens": -1}'),
        ("POST", "/v1/completions", b'{"prompt": "5", "max_tokens": 64}'),
        ("POST", "/v1/completions", b'{"prompt": "5", "early_exit": {"mode": "x"}}'),
    ],
)
def test_bad_input_is_4xx_and_server_keeps_serving(env, method, path, raw):
    status, out = _post(env["port"], method, path, raw=raw)
    assert status in (400, 422), out
    assert out["error"]["message"]
    assert _post(env["port"], "GET", "/health", raw=b"")[0] == 200


def test_echo_scores_prompt_through_the_pipeline(env):
    """PP=2: the prompt scores of prompt + greedy completion are the CLI's greedy logprobs
    (full model), and each position's most likely token is the one greedy chose."""
    ref = env["greedy"][1]
    ids = [int(t) for t in PROMPTS[1].split()] + ref["token_ids"]
    body = {"prompt": " ".join(map(str, ids)), "max_tokens": 0, "echo": True, "logprobs": 2}
    status, out = _post(env["port"], "POST", "/v1/completions", body)
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    n = len(ids) - len(ref["token_ids"])
    assert lp["tokens"] == [str(t) for t in ids] and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][n:] == pytest.approx(ref["logprobs"], abs=1e-5)
    assert [next(iter(top)) for top in lp["top_logprobs"][n:]] == [str(t) for t in ids[n:]]
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])


def test_rank_error_is_reported_and_server_recovers(env):
    status, out = _post(env["port"], "PUT", "/api", {"prompts": [f"1 {FAULT_TOKEN}"],
                        "tokens_to_generate": 2, "temperature": 0.0})  # fmt: skip
    assert status == 500, out
    assert "rank 1" in out["error"]["message"] and "injected fault" in out["error"]["message"]
    status, out = _post(env["port"], "PUT", "/api", {"prompts": [PROMPTS[0]],
                        "tokens_to_generate": MAX_NEW, "temperature": 0.0})  # fmt: skip
    assert status == 200 and out["tokens"][0] == env["greedy"][0]["token_ids"]


def test_fuzz_schema_no_5xx(env):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    port = env["port"]
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(-2, 3),
                        st.text(alphabet="0123456789 ab", max_size=12))  # fmt: skip
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3), max_leaves=5)
    api_keys = ["prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p",
                "add_BOS", "stop_sequences", "random_seed", "use_early_exit", "early_exit_thres",
                "exit_layers", "print_max_prob", "junk"]  # fmt: skip
    v1_keys = ["prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "logprobs",
               "echo", "stream", "n", "early_exit"]  # fmt: skip
    ee_keys = ("mode", "metric", "threshold", "exit_layers")
    ee = st.fixed_dictionaries({}, optional={k: values for k in ee_keys})
    api = st.fixed_dictionaries(
        {"prompts": st.lists(st.sampled_from(["5 6", "7", "x", ""]), max_size=2)},
        optional={k: values for k in api_keys[1:]},
    )
    v1 = st.fixed_dictionaries(
        {"prompt": st.one_of(st.sampled_from(["5 6", "9"]), values)},
        optional={**{k: values for k in v1_keys[1:]}, "early_exit": st.one_of(ee, values)},
    )

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.one_of(api.map(lambda b: ("PUT", "/api", b)),
                     v1.map(lambda b: ("POST", "/v1/completions", b))))  # fmt: skip
    def check(case):
        method, path, body = case
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
            body["max_tokens"] = min(body["max_tokens"], 8)  # keep generation cheap
        if isinstance(body.get("tokens_to_generate"), int):
            body["tokens_to_generate"] = min(body["tokens_to_generate"], 8)
        status, out = _post(port, method, path, body)
        assert status < 500, (body, out)

    assert hypothesis.__version__
    check()
    assert _post(port, "GET", "/health", raw=b"")[0] == 200


def _load(port, n_requests, clients):
    bodies = []
    for i in range(8):
        ee = {"mode": "early_exit", "threshold": THRES} if i % 2 else {"mode": "none"}
        temp = 0.0 if i % 4 < 2 else 0.8
        bodies.append({"prompt": f"{i + 1} {i + 2} {i + 3}", "max_tokens": 6 + i % 3,
                       "temperature": temp, "seed": i, "early_exit": ee})  # fmt: skip
    single = [
        _post(port, "POST", "/v1/completions", b)[1]["choices"][0]["token_ids"] for b in bodies
    ]
    work = [bodies[k % len(bodies)] for k in range(n_requests)]
    with ThreadPoolExecutor(clients) as pool:
        outs = list(pool.map(lambda b: _post(port, "POST", "/v1/completions", b), work))
    errors = [o for s, o in outs if s != 200]
    assert not errors, errors[:3]
    for k, (_, out) in enumerate(outs):
        assert out["choices"][0]["token_ids"] == single[k % len(bodies)], k


def test_concurrent_load_small(env):
    _load(env["port"], 40, 8)
    status, text = _post(env["port"], "GET", "/metrics", raw=b"")
    assert "ee_generated_tokens_total" in text and "ee_mean_exit_layer" in text


@pytest.mark.slow
def test_concurrent_load_200(env):
    _load(env["port"], 200, 8)


def _metric(port, name) -> float:
    text = _post(port, "GET", "/metrics", raw=b"")[1]
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))


def test_disconnect_cancels_running_generation_on_every_rank(env):
    """A client that leaves a running stream stops its generation on both ranks (they agree
    per decode step): the next short request is served, and the cancelled request generated
    far fewer than its max_tokens (counted by /metrics, no timing)."""
    port = env["port"]
    body = {"prompt": [PROMPTS[0]] * 4, "max_tokens": 60, "temperature": 0}  # context: 64
    status, out = _post(port, "POST", "/v1/completions", body)
    assert status == 200, out
    full = out["usage"]["completion_tokens"]  # what the request makes when nobody leaves
    tokens0 = _metric(port, "ee_generated_tokens_total")
    cancelled0 = _metric(port, "ee_cancelled_requests_total")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200
    while not resp.readline().startswith(b"data: "):  # the generation is running
        pass
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    status, out = _post(port, "POST", "/v1/completions",
                        {"prompt": PROMPTS[1], "max_tokens": 2, "temperature": 0})  # fmt: skip
    assert status == 200, out
    assert out["choices"][0]["token_ids"] == env["greedy"][1]["token_ids"][:2]
    # The short request ran after the long batch ended, so its tokens are counted by now.
    assert _metric(port, "ee_cancelled_requests_total") == cancelled0 + 1
    long_tokens = _metric(port, "ee_generated_tokens_total") - tokens0 - 2
    assert 4 <= long_tokens < full // 2, (long_tokens, full)


def test_sigterm_stops_every_rank(env):
    """Last test: SIGTERM under load answers every open request (200, or 503 past the
    grace period: never a dropped connection), then ends the launcher and both ranks."""
    proc = env["proc"]
    body = {"prompt": PROMPTS[1], "max_tokens": MAX_NEW, "temperature": 0}
    pool = ThreadPoolExecutor(4)
    futures = [pool.submit(_post, env["port"], "POST", "/v1/completions", body) for _ in range(4)]
    deadline = time.time() + 30
    while "\nee_running_batch_size 0\n" in _post(env["port"], "GET", "/metrics", raw=b"")[1]:
        assert time.time() < deadline, "the load never reached the model"
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in children.stdout.split()]
    grandchildren = []
    for pid in pids:  # torchrun's workers
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        grandchildren += [int(p) for p in out.split()]
    proc.send_signal(signal.SIGTERM)
    statuses = sorted(f.result(timeout=60)[0] for f in futures)
    pool.shutdown()
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    proc.wait(40)  # raises TimeoutExpired if the launcher hangs
    alive = []
    for pid in pids + grandchildren:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    assert not alive, f"still running after SIGTERM: {alive}"
