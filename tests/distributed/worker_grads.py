"""torchrun worker: one forward/backward (no optimizer step) and report gradient norms.

Prints, from the rank holding global layer 1 (pipeline stage 0, TP rank 0, DP rank 0),
one JSON line `GRADS {"layer1": norm}` with the gradient norm of decoder layer 1.
"""

import json
import sys


def main() -> None:
    import megatron.early_exit  # noqa: F401, I001  (first: guards broken accelerators)
    from megatron.core import parallel_state

    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.pipeline import get_forward_backward_func
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed, world_size_from_env
    from megatron.early_exit.training.trainer import Trainer

    platform = init_platform()
    run = parse_run_config(sys.argv[1:], world_size_from_env())
    trainer = Trainer(run, platform)
    state = trainer.state
    state.model.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=lambda it, m: trainer._forward_step(trainer.exit_weights.at(0), it, m),
        data_iterator=trainer._microbatches(0),
        model=state.model,
        num_microbatches=trainer.num_microbatches,
        seq_length=run.model.seq_length,
        micro_batch_size=run.training.micro_batch_size,
        config=trainer.config,
    )
    if (
        parallel_state.is_pipeline_first_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    ):
        layer = state.unwrapped.decoder.layers[0]
        sq = sum(float(p.main_grad.double().norm() ** 2) for p in layer.parameters())
        print("GRADS " + json.dumps({"layer1": sq**0.5}), flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
