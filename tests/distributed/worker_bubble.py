"""torchrun worker for tests/distributed/test_bubble_filling.py (no tests here).

Modes (first argument):
  toy OUT P M WARM COOL   tagged toy stages: check ids of data, activations and gradients
  pipe OUT <train flags>  real model: plain 1F1B grads, the executor with no fills (must be
                          bit-identical), then the filled schedule's grads -> OUT.rank*.pt
  ref OUT SPEC <flags>    PP=1 reference: the documented objective computed explicitly
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace


def _toy(out: str, P: int, M: int, warm: int, cool: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron.early_exit.pipeline.bubble_filling import forward_backward_bubble_filling
    from megatron.early_exit.pipeline.fill_plan import plan_schedule

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=P)
    r = parallel_state.get_pipeline_model_parallel_rank()
    schedule = plan_schedule(P, M, list(range(P)), 2.0, warm, cool)
    shape = (4, 1, 8)
    log = []

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))
            self.inp = None

        def set_input_tensor(self, t):
            self.inp = t

        def forward(self, tag):
            x = self.inp if r > 0 else torch.full(shape, float(tag))
            seen = float(x.detach()[0, 0, 0])
            assert seen == tag, f"stage {r}: data {tag} but activation {seen}"
            y = x * self.w
            return SimpleNamespace(output=y, exit_states={0: SimpleNamespace(hidden=y)}, tag=seen)

    model = Toy()

    def step(it, m):
        tag = next(it)
        out = m(tag)

        def loss_func(o):
            assert o.tag == tag, f"stage {r}: loss of {tag} on output of {o.tag}"
            log.append(tag)
            return (o.output * tag).sum(), {}

        return out, loss_func

    config = SimpleNamespace(
        sequence_parallel=False, hidden_size=8, pipeline_dtype=torch.float32,
        grad_scale_func=None, deallocate_pipeline_outputs=True, finalize_model_grads_func=None,
    )  # fmt: skip
    # Check every received gradient: with loss (out * id).sum() on every stage the gradient
    # arriving at stage r for id i is i * (stages r+1..depth) / M per element.
    orig_backward = __import__(
        "megatron.early_exit.pipeline.schedules", fromlist=["_backward"]
    )._backward
    import megatron.early_exit.pipeline.schedules as base

    def checked_backward(inp, out_t, loss, grad, n, cfg):
        if grad is not None:
            mb = log[-1]
            expected = mb * (schedule.depth(_id(mb)) - r) / n
            got = float(grad[0, 0, 0])
            assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), (r, mb, got, expected)
        return orig_backward(inp, out_t, loss, grad, n, cfg)

    def _id(tag):  # tags: main id i -> i + 1 (0 is ambiguous), fill slot k -> 1000 + k
        if tag >= 1000:
            return M + int(tag) - 1000
        return int(tag) - 1

    base._backward = checked_backward
    for _ in range(2):  # twice: state must not leak between iterations
        log.clear()
        forward_backward_bubble_filling(
            step, iter(float(i + 1) for i in range(M)), model, M, 4, 1, config,
            schedule=schedule, fill_data_iterator=lambda k: iter([1000.0 + k]),
        )  # fmt: skip
        expected = [
            (a.mb + 1 if a.mb < M else 1000 + schedule.fill(a.mb).index)
            for a in schedule.stages[r]
            if a.kind == "B"
        ]
        assert log == expected, (r, log, expected)
    with open(f"{out}.rank{dist.get_rank()}", "w") as f:
        json.dump({"stage": r, "backwards": len(log), "actions": len(schedule.stages[r])}, f)
    dist.barrier()
    dist.destroy_process_group()


def _param_grads(model) -> dict:
    """main_grad of decoder layers and exit heads, named by global layer number."""
    offset = model.layer_offset
    grads = {}
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None)
        if g is None or "tied_exit_weight" in name or "word_embeddings" in name:
            continue
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + offset)
        elif not name.startswith("exit_heads"):
            continue
        grads[".".join(parts)] = g.detach().clone().double()
    return grads


def _pipe(out: str, argv: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    import megatron.early_exit  # noqa: F401
    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.pipeline import bubble_filling as bf
    from megatron.early_exit.pipeline import fill_plan
    from megatron.early_exit.pipeline.schedules import forward_backward_1f1b
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed, world_size_from_env
    from megatron.early_exit.training.trainer import Trainer

    platform = init_platform()
    run = parse_run_config(argv, world_size_from_env())
    trainer = Trainer(run, platform)
    state, model = trainer.state, trainer.state.unwrapped
    weights = trainer.exit_weights.at(0)

    def one(schedule_func):
        state.model.zero_grad_buffer()
        metrics = schedule_func(
            forward_step_func=lambda it, m: trainer._forward_step(weights, it, m),
            data_iterator=trainer._microbatches(0),
            model=state.model,
            num_microbatches=trainer.num_microbatches,
            seq_length=run.model.seq_length,
            micro_batch_size=run.training.micro_batch_size,
            config=trainer.config,
        )
        return _param_grads(model), metrics

    plain, plain_metrics = one(forward_backward_1f1b)
    empty = fill_plan.plan_schedule(
        trainer.fill_schedule.num_stages, trainer.num_microbatches, [0], 2.0, 0, 0
    )
    from functools import partial

    nofill, nofill_metrics = one(partial(bf.forward_backward_bubble_filling, schedule=empty))
    for k in plain:
        assert torch.equal(plain[k], nofill[k]), f"no-fill executor differs from 1F1B at {k}"
    assert len(plain_metrics) == len(nofill_metrics)
    for a, b in zip(plain_metrics, nofill_metrics):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    filled, _ = one(trainer._train_schedule(0))
    if parallel_state.get_data_parallel_rank() == 0:
        record = {
            "plain": plain,
            "filled": filled,
            "fills": [f.__dict__ for f in trainer.fill_schedule.fills],
            "M": trainer.num_microbatches,
            "dp": trainer.dp_size,
            "P": run.parallel.pipeline_model_parallel_size,
            # Exit -> owning stage as the built model places it (the reference must not
            # take this from the module under test).
            "exit_stage": {n: parallel_state.get_pipeline_model_parallel_rank()
                           for n in model.local_exit_layers},
        }  # fmt: skip
        torch.save(record, f"{out}.rank{dist.get_rank()}.pt")
    destroy_distributed()


def _ref(out: str, spec_path: str, argv: list[str]) -> None:
    import torch

    import megatron.early_exit  # noqa: F401
    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.pipeline.losses import masked_mean
    from megatron.early_exit.pipeline.schedules import forward_backward_no_pipelining
    from megatron.early_exit.platform import init_platform
    from megatron.early_exit.platform.distributed import destroy_distributed, world_size_from_env
    from megatron.early_exit.training.trainer import Trainer

    with open(spec_path) as f:
        spec = json.load(f)
    platform = init_platform()
    run = parse_run_config(argv, world_size_from_env())
    trainer = Trainer(run, platform)
    state, model = trainer.state, trainer.state.unwrapped
    weights = trainer.exit_weights.at(0)
    M_ref = trainer.num_microbatches  # = M x dp of the pipelined run: the same 1/(M dp)
    state.model.zero_grad_buffer()
    forward_backward_no_pipelining(
        lambda it, m: trainer._forward_step(weights, it, m), trainer._microbatches(0),
        state.model, M_ref, run.model.seq_length, run.training.micro_batch_size, trainer.config,
    )  # fmt: skip
    main_only = _param_grads(model)
    stage_of = {int(n): s for n, s in spec["exit_stage"].items()}
    assert sorted(stage_of) == sorted(run.exits.exit_layer_nums), stage_of
    dp, K, mbs = spec["dp"], len(spec["fills"]), run.training.micro_batch_size
    for d in range(dp):
        for f in spec["fills"]:
            assert f["floor"] == 0, "the reference detaches nothing (PP=2 fills have floor 0)"
            # docs/bubble_filling.md, iteration i = 0: fill slot k on DP rank d reads the
            # mbs samples from train_iters * gbs + ((i * dp + d) * K + k) * mbs.
            first = run.training.train_iters * trainer.global_batch_size
            first += ((0 * dp + d) * K + f["index"]) * mbs
            idx = list(range(first, first + mbs))
            batch = trainer.dataset.batch(idx).to(trainer.device)
            output = state.model(batch.tokens, batch.position_ids, None, labels=batch.labels)
            loss = 0.0
            for n, st in sorted(output.exit_states.items()):
                if f["floor"] <= stage_of[n] <= f["depth"]:
                    per_token, _ = model.exit_loss(n, st, batch.labels)
                    loss = loss + weights[n] * masked_mean(per_token, batch.loss_mask)
            (loss / M_ref).backward()
    torch.save({"main": main_only, "filled": _param_grads(model)}, f"{out}.pt")
    destroy_distributed()


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "toy":
        _toy(out, *(int(x) for x in sys.argv[3:7]))
    elif mode == "pipe":
        _pipe(out, sys.argv[3:])
    else:
        _ref(out, sys.argv[3], sys.argv[4:])
