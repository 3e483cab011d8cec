"""--exit-distillation: exits trained on KL(final layer || exit) instead of cross entropy.

* the vocab-parallel KL (TP=1 here; TP=2 in tests/distributed/test_exit_distillation.py)
  equals a float64 log_softmax reference, and so does its gradient;
* an exit that is a copy of the LM head has KL ~0 (its cross entropy is not);
* the LM loss computed from the logits equals the forward-with-labels loss;
* EE-Tuning: one step trains only exit heads; normal training: the final layer's gradient
  is its LM loss gradient alone (the teacher is detached);
* flags that cannot work are refused.
"""

import pytest
import torch

from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

VOCAB, SEQ, BATCH = 256, 16, 2


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=7)


def _model(init_method_std=0.02, **exit_kwargs):
    from megatron.early_exit.config import ExitConfig, RunConfig, build_transformer_config
    from megatron.early_exit.model import build_model

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, VOCAB
    run.model.seq_length = SEQ
    run.model.init_method_std = init_method_std
    run.exits = ExitConfig(**exit_kwargs)
    run.validate()
    torch.manual_seed(0)
    return build_model(build_transformer_config(run), VOCAB, SEQ, True, "learned_absolute")


def _batch():
    from megatron.early_exit.data import Batch

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = torch.ones(BATCH, SEQ)
    mask[1, -5:] = 0.0  # padding: masked tokens must not count
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return Batch(tokens[:, :-1], tokens[:, 1:], mask, positions)


def _reference_kl(teacher_logits, student_logits):
    """float64 KL(softmax(teacher) || softmax(student)) per token, with torch's log_softmax."""
    log_p = torch.log_softmax(teacher_logits.double(), -1)
    log_q = torch.log_softmax(student_logits.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_kl_and_its_gradient_match_a_float64_reference(dist_world):
    from megatron.early_exit.model.gpt_model import (
        vocab_parallel_kl_divergence,
        vocab_parallel_log_softmax,
    )

    g = torch.Generator().manual_seed(3)
    teacher = 3 * torch.randn(5, 3, 97, generator=g)
    student = (3 * torch.randn(5, 3, 97, generator=g)).requires_grad_()
    weights = torch.rand(5, 3, generator=g)  # a non-uniform upstream gradient

    log_p = vocab_parallel_log_softmax(teacher)
    torch.testing.assert_close(log_p, torch.log_softmax(teacher, -1), rtol=0, atol=1e-5)
    kl = vocab_parallel_kl_divergence(student, log_p)
    (kl * weights).sum().backward()

    ref_student = student.detach().double().requires_grad_()
    ref = _reference_kl(teacher, ref_student)
    (ref * weights.double()).sum().backward()
    assert kl.dtype == torch.float32 and kl.shape == (5, 3)
    assert ref.min() > 0.5  # far from the trivial case
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-5, atol=1e-7)
    # KL(p || p) = 0 with zero gradient.
    same = teacher.clone().requires_grad_()
    zero = vocab_parallel_kl_divergence(same, log_p)
    zero.sum().backward()
    assert zero.abs().max() < 1e-5 and same.grad.abs().max() < 1e-6


def test_copy_of_the_lm_head_has_zero_kl_but_not_zero_cross_entropy(dist_world):
    """An exit after the last layer with the final norm copied (tied output) is the LM head."""
    from megatron.early_exit.pipeline.losses import lm_loss_and_teacher

    model = _model(exit_layer_nums=[4], use_exit_norm=True).eval()
    model.exit_heads.get(4).norm.load_state_dict(model.decoder.final_layernorm.state_dict())
    b = _batch()
    with torch.no_grad():
        with_labels = model(b.tokens, b.position_ids, None, labels=b.labels).output
        out = model(b.tokens, b.position_ids, None)
        assert out.output.shape == (BATCH, SEQ, VOCAB)  # logits [b, s, V/tp] without labels
        lm, teacher = lm_loss_and_teacher(model, out.output, b.labels)
        kl, ce, max_prob = model.exit_distillation_loss(4, out.exit_states[4], b.labels, teacher)
    # The LM loss from the logits is the forward-with-labels loss, token for token.
    assert lm.shape == with_labels.shape == (BATCH, SEQ)
    torch.testing.assert_close(lm, with_labels, rtol=0, atol=0)
    assert max_prob is None and kl.shape == ce.shape == (BATCH, SEQ)
    assert kl.abs().max() < 1e-5, kl.abs().max()
    torch.testing.assert_close(ce, with_labels, rtol=1e-5, atol=1e-5)  # the exit's CE = LM's
    assert ce.mean() > 5.0  # ~log(256) for an untrained model


def _exit_reference_loss(model, layer, state, teacher_logits, mask):
    """The distillation objective of one exit computed independently, in float64."""
    logits = model.exit_logits(layer, state).transpose(0, 1)  # [b, s, V]
    kl = _reference_kl(teacher_logits.detach(), logits)
    return (kl * mask).sum() / mask.sum()


def test_ee_tuning_step_trains_only_exit_heads_with_the_kl_objective(dist_world):
    from megatron.early_exit.model import ExitState
    from megatron.early_exit.tuning.session import freeze_backbone, make_exit_tuning_loss_func

    # Larger weights than the default init: peaked, differing distributions (KL ~1, not ~0).
    model = _model(0.3, exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_mlp=True)
    trainable = freeze_backbone(model)
    b = _batch()
    weights = {1: 0.5, 3: 1.0}
    with torch.no_grad():  # the EE-Tuning schedule runs the backbone without autograd
        plain_out = model(b.tokens, b.position_ids, None, labels=b.labels)
        out = model(b.tokens, b.position_ids, None)
    plain = make_exit_tuning_loss_func(b, model, weights, False, True)
    _, plain_metrics = plain(plain_out)
    final_logits = out.output.clone()  # the loss works in place on the logits (like megatron's)
    distill = make_exit_tuning_loss_func(b, model, weights, False, True, exit_distillation=True)
    total, metrics = distill(out)
    # Reported numbers: the same LM loss and exit cross entropies, plus the KL per exit.
    for key in ("lm_loss", "exit_1", "exit_3"):
        torch.testing.assert_close(metrics[key], plain_metrics[key], rtol=1e-6, atol=0)
    assert set(metrics) == {"lm_loss", "exit_1", "exit_3", "exit_kl_1", "exit_kl_3"}

    total.backward()
    grads = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None
    reference = sum(
        weights[n]
        * _exit_reference_loss(
            model, n, ExitState(out.exit_states[n].hidden.detach()), final_logits, b.loss_mask
        )
        for n in (1, 3)
    )
    torch.testing.assert_close(total.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        metrics["exit_kl_1"].double(),
        _exit_reference_loss(model, 1, out.exit_states[1], final_logits, b.loss_mask).detach(),
        rtol=1e-5,
        atol=0,
    )
    reference.backward()
    for p, grad in zip(trainable, grads):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-7)

    # One optimizer step changes exit-head parameters only.
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for p, grad in zip(trainable, grads):
        p.grad = grad
    torch.optim.Adam(trainable, lr=1e-2).step()
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith("exit_heads.") for k in changed), changed
    assert any(".mlp." in k for k in changed) and any(".norm." in k for k in changed)


def test_normal_training_final_layer_gets_only_its_lm_gradient(dist_world):
    from megatron.early_exit.pipeline.losses import make_loss_func, masked_mean

    model = _model(0.3, exit_layer_nums=[2], use_exit_norm=True, use_dynamic_exit_layer_weight=True)
    b = _batch()
    above_exit = {
        name: p
        for name, p in model.named_parameters()
        if name.startswith(("decoder.layers.2.", "decoder.layers.3.", "decoder.final_layernorm"))
    }
    assert above_exit

    loss_func = make_loss_func(b, model, {2: 1.0}, True, exit_distillation=True)
    total, metrics = loss_func(model(b.tokens, b.position_ids, None))
    total.backward()
    distill_grads = {n: p.grad.clone() for n, p in above_exit.items()}
    exit_grad = model.exit_heads.get(2).norm.weight.grad.clone()
    model.zero_grad()

    lm_only = masked_mean(
        model(b.tokens, b.position_ids, None, labels=b.labels).output, b.loss_mask
    )
    torch.testing.assert_close(lm_only, metrics["lm_loss"], rtol=1e-6, atol=0)
    lm_only.backward()
    for name, p in above_exit.items():
        torch.testing.assert_close(distill_grads[name], p.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert exit_grad.abs().sum() > 0  # the exit itself is trained (by the KL)
    assert metrics["exit_kl_2"] > 0


BASE = ["--mock-data", "--vocab-size", "100", "--num-layers", "8"]
EXITS = ["--exit-layer-nums", "2", "4", "--use-exit-norm", "--exit-distillation"]


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--exit-distillation"], 1, "has no exits"),
        (["--tune-exit", "--load", "/nonexistent", *EXITS, "--pipeline-model-parallel-size", "2",
          "--tune-exit-pipeline-parallel-size", "1"], 1, "drops the last of the 2 stages"),
        ([*EXITS, "--pipeline-model-parallel-size", "2", "--fill-explicit-bubbles"], 2,
         "--exit-distillation with --pipeline-model-parallel-size > 1 does not fit "
         "--fill-explicit-bubbles"),
        (["--exit-distillation-top-k", "4"], 1,
         "--exit-distillation-top-k needs --exit-distillation"),
        ([*EXITS, "--exit-distillation-top-k", "0"], 1, "--exit-distillation-top-k must be >= 1"),
    ],
)  # fmt: skip
def test_refused_layouts(argv, world, message):
    from megatron.early_exit.arguments import parse_run_config
    from megatron.early_exit.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_run_config([*BASE, *argv], world)


def test_accepted_with_tensor_parallelism_and_ee_tuning():
    from megatron.early_exit.arguments import parse_run_config

    run = parse_run_config([*BASE, *EXITS, "--tensor-model-parallel-size", "2"], 2)
    assert run.exits.exit_distillation
    run = parse_run_config([*BASE, *EXITS, "--tune-exit", "--load", "/nonexistent"], 1)
    assert run.exits.exit_distillation and run.training.tune_exit


def test_accepted_with_pipeline_parallelism():
    from megatron.early_exit.arguments import parse_run_config

    pp2 = ["--pipeline-model-parallel-size", "2", "--exit-distillation-top-k", "8"]
    run = parse_run_config([*BASE, *EXITS, *pp2, "--tensor-model-parallel-size", "2"], 4)
    assert run.exits.exit_distillation_top_k == 8
    tune = ["--tune-exit", "--load", "/nonexistent", "--tune-exit-pipeline-parallel-size", "2"]
    run = parse_run_config([*BASE, *EXITS, *pp2, *tune], 2)
    assert run.exits.exit_distillation and run.training.tune_exit


def test_accepted_with_virtual_pipeline_stages_and_ee_tuning():
    from megatron.early_exit.arguments import parse_run_config

    vpp = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size",
           "2", "--no-batch-p2p-comm", "--untie-exit-output-weights", "--global-batch-size",
           "4"]  # fmt: skip
    run = parse_run_config([*BASE, *EXITS, *vpp], 2)
    assert run.exits.exit_distillation and run.parallel.virtual_pipeline_model_parallel_size == 2
    run = parse_run_config([*BASE, *EXITS, *vpp, "--tune-exit", "--load", "/nonexistent"], 2)
    assert run.training.tune_exit
