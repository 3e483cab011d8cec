"""torchrun worker for test_checkpoint_resume.py (no tests here): the real entry point with a
fault injected through its checkpoint callback.

    torchrun ... tests/distributed/worker_fault.py ITERATION [pretrain flags...]

SIGKILLs every rank once the save of ITERATION is staged (written to `iter_N.tmp/`, not yet
renamed into place), like a node lost mid-save.
"""

import os
import signal
import sys

from pretrain_early_exit_gpt import main


def kill_when_staged(at: int):
    def on_staged(iteration: int) -> None:
        if iteration == at:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_staged


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], on_checkpoint_staged=kill_when_staged(int(sys.argv[1]))))
