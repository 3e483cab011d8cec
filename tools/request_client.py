"""Command-line client for the generation server (stdlib only).

    # Megatron-LM / EE-LLM endpoint
    python tools/request_client.py --url http://127.0.0.1:5000 --api megatron \
        --prompt "ROMEO:" --max-tokens 32 --early-exit --threshold 0.8 --print-exits
    # OpenAI completions endpoint, streamed, prompts from a JSONL file ({"prompt": ...} per line)
    python tools/request_client.py --api openai --prompts-file prompts.jsonl --stream \
        --mode early_exit --threshold 0.9 --temperature 0

Prints the generated text (and, with --print-exits, each token's exit layer); --json prints
the raw responses. Exit status 1 on an HTTP error (the server's message is printed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from urllib.parse import urlsplit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:5000", help="server base URL")
    p.add_argument("--api", choices=["megatron", "openai"], default="openai")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--prompts-file", help="JSONL with a 'prompt' key per line, or plain lines")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="megatron API only")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    p.add_argument("--logprobs", action="store_true")
    p.add_argument("--echo", action="store_true", help="openai API: include the prompt")
    p.add_argument("--add-bos", action="store_true", help="megatron API only")
    p.add_argument("--stream", action="store_true", help="openai API: print tokens as they come")
    g = p.add_argument_group("early exit")
    g.add_argument("--early-exit", action="store_true", help="shorthand for --mode early_exit")
    g.add_argument("--mode", choices=["none", "early_exit", "self_speculative"], default=None)
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--target-agreement", type=float, default=None,
                   help="calibrated per-exit thresholds for this agreement (instead of "
                   "--threshold)")  # fmt: skip
    g.add_argument("--metric", choices=["max_prob", "margin", "entropy", "learned"], default=None,
                   help="learned: the exits' confidence heads (if the model has them)")  # fmt: skip
    g.add_argument("--exit-layers", type=int, nargs="+", default=None)
    g.add_argument("--method", choices=["auto", "kv_recompute", "pipeline"], default=None)
    g.add_argument("--draft-length", type=int, default=None)
    g.add_argument("--draft-threshold", type=float, default=None,
                   help="self_speculative: stop drafting below this draft confidence")  # fmt: skip
    g.add_argument("--draft-vocab-size", type=int, default=None,
                   help="self_speculative: draft over the N most frequent tokens")  # fmt: skip
    g.add_argument("--print-exits", action="store_true", help="show each token's exit layer")
    p.add_argument("--json", action="store_true", help="print raw JSON responses")
    p.add_argument("--timeout", type=float, default=600.0)
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            for line in f:
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    prompts.append(json.loads(line)["prompt"])
                else:
                    prompts.append(line.rstrip("\n"))
    if not prompts:
        raise SystemExit("error: give --prompt or --prompts-file")
    return prompts


def megatron_body(args, prompts: list[str]) -> dict:
    body = {"prompts": prompts, "tokens_to_generate": args.max_tokens,
            "temperature": args.temperature, "logprobs": args.logprobs,
            "add_BOS": args.add_bos}  # fmt: skip
    optional = {"top_k": args.top_k, "top_p": args.top_p, "random_seed": args.seed,
                "stop_sequences": args.stop, "early_exit_thres": args.threshold,
                "exit_layers": args.exit_layers, "early_exit_metric": args.metric,
                "target_agreement": args.target_agreement}  # fmt: skip
    for key, value in optional.items():
        if value is not None:
            body[key] = value
    mode = args.mode or ("early_exit" if args.early_exit else None)
    if mode not in (None, "none", "early_exit"):
        raise SystemExit("error: the megatron API supports --mode none|early_exit only")
    body["use_early_exit"] = mode == "early_exit"
    body["print_max_prob"] = args.print_exits
    return body


def openai_body(args, prompts: list[str]) -> dict:
    body = {"prompt": prompts[0] if len(prompts) == 1 else prompts,
            "max_tokens": args.max_tokens, "temperature": args.temperature,
            "stream": args.stream, "echo": args.echo}  # fmt: skip
    for key, value in (("top_p", args.top_p), ("seed", args.seed), ("stop", args.stop)):
        if value is not None:
            body[key] = value
    if args.logprobs:
        body["logprobs"] = 1
    mode = args.mode or ("early_exit" if args.early_exit else None)
    ee = {"mode": mode} if mode else {}
    for key in ("threshold", "metric", "exit_layers", "method", "draft_length",
                "draft_threshold", "draft_vocab_size", "target_agreement"):  # fmt: skip
        if getattr(args, key) is not None:
            ee[key] = getattr(args, key)
    if ee:
        ee.setdefault("mode", "early_exit")
        body["early_exit"] = ee
    return body


def request(args, method: str, path: str, body: dict):
    url = urlsplit(args.url)
    conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(url.hostname, url.port, timeout=args.timeout)
    conn.request(method, url.path.rstrip("/") + path, body=json.dumps(body),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    return conn, conn.getresponse()


def _stats_line(st: dict) -> str:
    line = f"avg layers {st.get('avg_layers_used', 0.0):.2f}"
    if st.get("verify_passes"):
        line += (
            f", drafted {st['drafted_tokens']}, accepted {st['accepted_tokens']} "
            f"(acceptance {st['acceptance_rate']:.2f}, {st['verify_passes']} verifications)"
        )
    return line


def _fail(resp) -> int:
    raw = resp.read().decode(errors="replace")
    try:
        msg = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = raw
    print(f"error: HTTP {resp.status}: {msg}", file=sys.stderr)
    return 1


def run(args) -> int:
    prompts = read_prompts(args)
    if args.api == "megatron":
        conn, resp = request(args, "PUT", "/api", megatron_body(args, prompts))
        if resp.status != 200:
            return _fail(resp)
        out = json.loads(resp.read())
        if args.json:
            print(json.dumps(out, indent=1))
            return 0
        for i, text in enumerate(out["text"]):
            print(f"=== [{i}] {text}")
            if args.print_exits and out.get("exit_layers"):
                print(f"    exit layers: {out['exit_layers'][i]}")
                print(f"    {_stats_line((out.get('early_exit_stats') or [{}])[i])}")
        return 0
    conn, resp = request(args, "POST", "/v1/completions", openai_body(args, prompts))
    if resp.status != 200:
        return _fail(resp)
    if not args.stream:
        out = json.loads(resp.read())
        if args.json:
            print(json.dumps(out, indent=1))
            return 0
        for c in out["choices"]:
            print(f"=== [{c['index']}] ({c['finish_reason']}) {c['text']}")
            if args.print_exits:
                print(f"    exit layers: {c.get('exit_layers')}")
            if c.get("early_exit_stats"):
                print(f"    {_stats_line(c['early_exit_stats'])}")
        u = out.get("usage") or {}
        print(f"--- usage: {u.get('prompt_tokens')} prompt + {u.get('completion_tokens')} tokens")
        return 0
    current = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        if args.json:
            print(data)
            continue
        for c in json.loads(data)["choices"]:
            if c["index"] != current:
                current = c["index"]
                print(f"\n=== [{current}] ", end="")
            exits = (
                f"[{','.join(map(str, c.get('exit_layers') or []))}]" if args.print_exits else ""
            )
            print(c["text"] + (exits if c["text"] else ""), end="", flush=True)
            if c.get("finish_reason"):
                print(f"  ({c['finish_reason']})", end="")
    print()
    conn.close()
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (OSError, http.client.HTTPException) as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
