"""The top-k teacher of exit distillation across pipeline stages (TP=1 here; TP=2 and PP=2
in tests/distributed/test_exit_distillation.py):

* k = vocabulary: the (k + 1)-bucket KL equals the dense KL, gradient included;
* small k: it is a lower bound of the dense KL (data processing inequality) and its logit
  gradient is within 2 r (L1, per token) of the dense one, r = the teacher's tail mass;
* the tail mass is summed directly: exactly 0 at k = vocabulary.
"""

import pytest
import torch

from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

V = 97


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=7)


def _logits():
    g = torch.Generator().manual_seed(5)
    teacher = 3 * torch.randn(6, 2, V, generator=g)
    student = 3 * torch.randn(6, 2, V, generator=g)
    weights = torch.rand(6, 2, generator=g)  # a non-uniform upstream gradient
    return teacher, student, weights


def _kl_and_grad(fn, student, weights):
    student = student.clone().requires_grad_()
    kl = fn(student)
    (kl * weights).sum().backward()
    return kl.detach(), student.grad


def _dense_and_top_k(k):
    from megatron.early_exit.model.gpt_model import (
        vocab_parallel_kl_divergence,
        vocab_parallel_log_softmax,
        vocab_parallel_top_k_kl,
        vocab_parallel_top_k_teacher,
    )

    teacher, student, weights = _logits()
    log_p = vocab_parallel_log_softmax(teacher)
    top = vocab_parallel_top_k_teacher(log_p, k)
    dense = _kl_and_grad(lambda z: vocab_parallel_kl_divergence(z, log_p), student, weights)
    sparse = _kl_and_grad(lambda z: vocab_parallel_top_k_kl(z, top), student, weights)
    return top, dense, sparse, weights


@pytest.mark.parametrize("k", [V, V + 50])
def test_whole_vocabulary_equals_the_dense_kl(dist_world, k):
    top, (kl, grad), (kl_k, grad_k), _ = _dense_and_top_k(k)
    assert top.k == V and torch.equal(top.tail, torch.zeros_like(top.tail))
    assert kl.min() > 0.5
    torch.testing.assert_close(kl_k, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 4, 20])
def test_small_k_bound(dist_world, k):
    top, (kl, grad), (kl_k, grad_k), weights = _dense_and_top_k(k)
    assert top.k == k and top.ids.shape == (6, 2, k)
    assert (top.log_probs[..., :-1] >= top.log_probs[..., 1:]).all()  # descending
    tail = top.tail
    assert tail.min() > 0 and torch.allclose(tail + top.log_probs.exp().sum(-1), torch.ones(6, 2))
    assert (kl_k >= -1e-6).all() and (kl_k <= kl + 1e-5).all()  # 0 <= KL_k <= KL
    # Per token: |grad_k - grad|_1 <= 2 r (the weights scale each token's gradient).
    gap = (grad_k - grad).abs().sum(-1)
    assert (gap <= 2 * tail * weights + 1e-5).all()
    assert gap.max() > 0  # the bound is not trivially met by equal gradients


def test_distillation_teachers_follow_the_flag(dist_world):
    """Without --exit-distillation-top-k the last stage's exits keep the dense teacher (the
    PP=1 path, bit for bit); with it they get the top-k one, as exits on other stages do."""
    from megatron.early_exit.config import ExitConfig, RunConfig, build_transformer_config
    from megatron.early_exit.model import build_model
    from megatron.early_exit.model.gpt_model import TopKTeacher, vocab_parallel_log_softmax
    from megatron.early_exit.pipeline.losses import distillation_teachers

    def model(top_k):
        run = RunConfig()
        run.data.mock_data, run.data.vocab_size = True, 128
        run.model.seq_length = 8
        run.exits = ExitConfig(
            exit_layer_nums=[2], exit_distillation=True, exit_distillation_top_k=top_k
        )
        run.validate()
        return build_model(build_transformer_config(run), 128, 8, True, "learned_absolute")

    dense = vocab_parallel_log_softmax(torch.randn(8, 2, 128))
    local, sent = distillation_teachers(model(None), dense)
    assert local is dense and sent is None  # PP=1: nothing to send
    local, sent = distillation_teachers(model(5), dense)
    assert isinstance(local, TopKTeacher) and local.k == 5 and sent is None


@pytest.mark.parametrize("top_k, k", [(None, 256), (8, 8), (1000, 256)])
def test_teacher_route_per_stage(monkeypatch, top_k, k):
    """8 layers on 4 stages, exits at 3 and 5 (stages 1 and 2): stage 3 sends, stage 2
    receives and relays, stage 1 only receives, stage 0 takes no part."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from megatron.early_exit.config import ExitConfig, RunConfig, build_transformer_config
    from megatron.early_exit.pipeline.teacher import TeacherRoute

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, 200
    run.model.num_layers = 8
    run.parallel.pipeline_model_parallel_size = run.parallel.world_size = 4
    run.exits = ExitConfig(
        exit_layer_nums=[3, 5], exit_distillation=True, exit_distillation_top_k=top_k
    )
    run.validate()
    config = build_transformer_config(run)
    model = SimpleNamespace(vocab_size=256)  # the padded vocabulary
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 4)
    for name in ("group", "prev_rank", "next_rank"):
        monkeypatch.setattr(parallel_state, f"get_pipeline_model_parallel_{name}", lambda: None)
    roles = []
    for rank in range(4):
        monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda r=rank: r)
        route = TeacherRoute(model, config, seq_length=16, micro_batch_size=2)
        assert route.active and route.shape == (16, 2, k)
        roles.append((route.receives, route.sends))
    assert roles == [(False, False), (True, False), (True, True), (False, True)]
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)
    assert not TeacherRoute(model, config, 16, 2).active  # PP=1: the teacher is local


@pytest.mark.parametrize(
    "pp, exits, earliest, roles",
    [
        # 8 layers, PP=2 x 2 chunks of 2 (virtual stages 0..3); exits 3 and 5 on virtual
        # stages 1 (rank 1's first chunk) and 2 (rank 0's second chunk): the teacher goes
        # 3 -> 2 -> 1, leaving rank 1 to come back to it after rank 0.
        (2, [3, 5], 1, [[(False, False), (True, True)], [(True, False), (False, True)]]),
        # PP=4 x 2 chunks of 1: the only exit on the last rank's first chunk (virtual
        # stage 3); virtual stages 4..6 on ranks 0..2 relay.
        (4, [4], 3, [[(False, False), (True, True)], [(False, False), (True, True)],
                     [(False, False), (True, True)], [(True, False), (False, True)]]),
    ],
)  # fmt: skip
def test_ring_teacher_route_per_chunk(monkeypatch, pp, exits, earliest, roles):
    """Which chunks of the interleaved schedule receive and send the teacher."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from megatron.early_exit.config import ExitConfig, RunConfig, build_transformer_config
    from megatron.early_exit.pipeline.losses import earliest_exit_virtual_stage
    from megatron.early_exit.pipeline.teacher import RingTeacherRoute

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, 200
    run.model.num_layers = 8
    run.parallel.pipeline_model_parallel_size = run.parallel.world_size = pp
    run.parallel.virtual_pipeline_model_parallel_size = 2
    run.parallel.batch_p2p_comm = False
    run.training.global_batch_size = 8
    run.exits = ExitConfig(exit_layer_nums=exits, exit_distillation=True, exit_distillation_top_k=8)
    run.exits.untie_exit_output_weights = True
    run.validate()
    config = build_transformer_config(run)
    assert earliest_exit_virtual_stage(config) == earliest
    chunks = [SimpleNamespace(vocab_size=256)] * 2
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: pp)
    for name in ("group", "prev_rank", "next_rank"):
        monkeypatch.setattr(parallel_state, f"get_pipeline_model_parallel_{name}", lambda: None)
    for rank in range(pp):
        monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda r=rank: r)
        route = RingTeacherRoute(chunks, config, seq_length=16, micro_batch_size=2)
        assert route.active and route.shape == (16, 2, 8)
        assert [(route.receives(c), route.sends(c)) for c in range(2)] == roles[rank], rank
