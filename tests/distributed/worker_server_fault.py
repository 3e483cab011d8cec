"""torchrun worker for test_server.py (no tests here): the real server entry point with a rank
fault injected through its coordinator hook.

    torchrun ... tests/distributed/worker_server_fault.py TOKEN [server flags...]

Rank 1 raises after a generate command (or a continuous-batching step joining a request)
one of whose prompts holds token id TOKEN.
"""

import importlib.util
import sys
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "tools" / "run_text_generation_server.py"


def fail_on_token(token: int, rank: int = 1):
    def after_execute(this_rank, command) -> None:
        if this_rank != rank or command.kind not in ("generate", "step"):
            return
        reqs = command.payload  # a step's requests are its joins (continuous batching)
        if command.kind == "step":
            reqs = [d for _, d in command.payload[0]["joins"]]
        if any(token in r.get("prompt_token_ids", []) for r in reqs):
            raise RuntimeError(f"injected fault on rank {this_rank} (token {token})")

    return after_execute


if __name__ == "__main__":  # dist_checkpointing starts spawn-based helpers: keep this guard
    spec = importlib.util.spec_from_file_location("run_text_generation_server", SERVER)
    server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server)
    sys.exit(server.main(sys.argv[2:], after_execute=fail_on_token(int(sys.argv[1]))))
