"""Activation recomputation with exits: same losses and gradients as without, every exit
captured once (TP1PP1, one process); chunk plans; bad flag combinations."""

import pytest
import torch

from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

VOCAB, SEQ, BATCH = 128, 16, 2


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=7)


def _run(recompute: tuple, layers: int = 4, **exit_kwargs):
    from megatron.early_exit.config import ExitConfig, RunConfig

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, VOCAB
    run.model.seq_length, run.model.num_layers = SEQ, layers
    run.exits = ExitConfig(**exit_kwargs)
    g, m, n = recompute
    run.recompute.recompute_granularity = g
    run.recompute.recompute_method = m
    run.recompute.recompute_num_layers = n
    return run.validate()


def _losses_and_grads(run, distill: bool = False):
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.model import build_model

    torch.manual_seed(0)
    model = build_model(build_transformer_config(run), VOCAB, SEQ, True, "learned_absolute")
    model.train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    out = model(tokens, positions, None, labels=labels)
    losses = {"lm": out.output.mean()}
    teacher = torch.log_softmax(torch.randn(SEQ, BATCH, VOCAB, generator=g), dim=-1)
    for layer, state in sorted(out.exit_states.items()):
        if distill:  # the distillation head: KL to a fixed teacher, recomputed the same way
            per_token, _, max_prob = model.exit_distillation_loss(
                layer, state, labels, teacher, with_max_prob=True
            )
        else:
            per_token, max_prob = model.exit_loss(layer, state, labels, with_max_prob=True)
        losses[layer] = (per_token * max_prob).mean()
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize(
    "recompute,exits",
    [
        (("full", "uniform", 2), dict(exit_layer_nums=[1, 3])),  # exits inside chunks
        (("full", "uniform", 4), dict(exit_layer_nums=[2, 3], pre_exit=True, use_exit_mlp=True)),
        (("full", "block", 2), dict(exit_layer_nums=[1, 4], untie_exit_output_weights=True)),
        (("selective", None, None), dict(exit_layer_nums=[2], use_exit_block=True)),
    ],
    ids=["full-uniform", "full-uniform-pre", "full-block", "selective-distillation"],
)
def test_recompute_gives_identical_losses_and_grads(dist_world, recompute, exits):
    distill = recompute[0] == "selective"
    base_losses, base_grads = _losses_and_grads(_run((None, None, None), **exits), distill)
    losses, grads = _losses_and_grads(_run(recompute, **exits), distill)
    assert losses.keys() == base_losses.keys() and len(losses) == 1 + len(exits["exit_layer_nums"])
    for k in base_losses:
        torch.testing.assert_close(losses[k], base_losses[k], rtol=0, atol=0)
    assert grads.keys() == base_grads.keys()
    for name in base_grads:
        torch.testing.assert_close(grads[name], base_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    # The exit losses reach the layers below them: layer 1 gets a gradient.
    assert grads["decoder.layers.0.mlp.linear_fc1.weight"].abs().sum() > 0


def test_exit_states_have_a_graph_and_hooks_stay_quiet_in_backward(dist_world):
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.model import build_model

    run = _run(("full", "uniform", 4), exit_layer_nums=[1, 2])
    model = build_model(build_transformer_config(run), VOCAB, SEQ, True, "learned_absolute")
    model.train()
    calls = []
    real = model.record_exit_state
    model.record_exit_state = lambda n, *a: (
        calls.append((n, model._capture is not None)),
        real(n, *a),
    )
    tokens = torch.zeros(BATCH, SEQ, dtype=torch.long)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    out = model(tokens, positions, None, labels=tokens)
    assert all(s.hidden.grad_fn is not None for s in out.exit_states.values())
    loss = out.output.mean() + sum(
        model.exit_loss(n, s, tokens)[0].mean() for n, s in out.exit_states.items()
    )
    loss.backward()  # reruns the chunk: no capture (and no error) in backward
    assert [c for c in calls if c[1]] == [(1, True), (2, True)]


def test_chunk_plans_cut_at_exits():
    from megatron.early_exit.model.recompute import chunk_plan

    assert chunk_plan(4, "uniform", 2, set()) == [(0, 2, True), (2, 4, True)]
    assert chunk_plan(4, "uniform", 4, {0}) == [(0, 1, True), (1, 4, True)]
    assert chunk_plan(5, "uniform", 2, {3}) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    assert chunk_plan(3, "block", 2, {0}) == [(0, 1, True), (1, 2, True), (2, 3, False)]
    # An uneven split's short stage: the chunk ends at its last layer.
    assert chunk_plan(1, "uniform", 2, set()) == [(0, 1, True)]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--recompute-method", "uniform"], "need --recompute-granularity full"),
        (["--recompute-num-layers", "1"], "need --recompute-granularity full"),
        (["--recompute-granularity", "full"], "--recompute-method uniform|block"),
        (
            ["--recompute-granularity", "full", "--recompute-method", "block"],
            "--recompute-num-layers N",
        ),
        (
            ["--recompute-granularity", "selective", "--recompute-method", "uniform"],
            "are for --recompute-granularity full",
        ),
        (
            [
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "uniform",
                "--recompute-num-layers",
                "3",
                "--pipeline-model-parallel-size",
                "2",
            ],
            "--recompute-num-layers 3 must be in 1..2",
        ),  # fmt: skip
    ],
)
def test_bad_recompute_flags_are_config_errors(flags, message):
    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        parse_run_config(["--mock-data", "--vocab-size", "128", *flags], world_size=2)
