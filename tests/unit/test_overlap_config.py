"""--overlap-* flags: bad combinations fail before any process group exists."""

import pytest

from megatron.early_exit.arguments import parse_run_config
from megatron.early_exit.config import ConfigError

pytestmark = pytest.mark.unit

BASE = ["--mock-data", "--vocab-size", "128"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--overlap-param-gather", "--overlap-grad-reduce"], "needs --use-distributed-optimizer"),
        (
            ["--overlap-param-gather", "--use-distributed-optimizer"],
            "--overlap-param-gather needs --overlap-grad-reduce",
        ),
        (["--overlap-grad-reduce", "--ddp-bucket-size", "0"], "--ddp-bucket-size must be > 0"),
    ],
)
def test_bad_overlap_flags_are_refused(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_run_config([*BASE, *argv], world_size=2)


def test_overlap_flags_land_in_the_config():
    run = parse_run_config(
        [*BASE, "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
         "--ddp-bucket-size", "1000"],
        world_size=2,
    )  # fmt: skip
    assert run.overlap.overlap_grad_reduce and run.overlap.overlap_param_gather
    assert run.overlap.ddp_bucket_size == 1000
