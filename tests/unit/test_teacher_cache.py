"""Cheaper EE-Tuning gives today's exit-head gradients (float64, tiny model):

* truncated backbone (`--tune-exit-truncate-backbone`: layers up to the deepest exit, no LM
  head) -> the same cross-entropy gradients, bit for bit;
* teacher cache (tools/cache_teacher.py, `--teacher-cache`) at full k, fp64 hidden states ->
  the same cross-entropy gradients bit for bit, and the same distillation gradients up to
  float32 rounding of today's KL;
* sparse top-k: the teacher is renormalised over its top k;
* a cache built for other exits / sequence length / backbone, or too small, is refused
  naming the file.
"""

import json

import pytest
import torch

from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

VOCAB, SEQ, BATCH = 256, 16, 2
EXITS = [1, 3]
WEIGHTS = {1: 0.5, 3: 1.0}


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=11)


def _run(**training):
    from megatron.early_exit.config import ExitConfig, RunConfig

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, VOCAB
    run.model.seq_length = SEQ
    run.model.init_method_std = 0.3  # peaked, differing distributions: KL ~1, not ~0
    run.exits = ExitConfig(exit_layer_nums=EXITS, use_exit_norm=True, use_exit_mlp=True)
    run.training.micro_batch_size = BATCH
    for k, v in training.items():
        setattr(run.training, k, v)
    return run


def _build(run):
    from megatron.early_exit.config import build_transformer_config
    from megatron.early_exit.model import build_model

    torch.manual_seed(0)
    model = build_model(build_transformer_config(run), VOCAB, SEQ, True, "learned_absolute")
    return model.double()


class _Data:
    """`.batch(indices)` over one fixed batch (the mock dataset's protocol)."""

    def __init__(self, batch):
        self.b = batch

    def batch(self, indices):
        from megatron.early_exit.data import Batch

        idx = list(indices)
        return Batch(self.b.tokens[idx], self.b.labels[idx], self.b.loss_mask[idx],
                     self.b.position_ids[idx])  # fmt: skip


def _batch():
    from megatron.early_exit.data import Batch

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = torch.ones(BATCH, SEQ)
    mask[1, -5:] = 0.0
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return Batch(tokens[:, :-1], tokens[:, 1:], mask, positions)


def _grads(model, loss_func, out):
    params = list(model.exit_heads.parameters())
    for p in params:
        p.grad = None
    total, metrics = loss_func(out)
    total.backward()
    return [p.grad.clone() for p in params], metrics


@pytest.fixture(scope="module")
def setting(dist_world, tmp_path_factory):
    """Today's gradients (CE and distillation), the model and a full-k fp64 cache of it."""
    from megatron.early_exit.tuning.session import freeze_backbone, make_exit_tuning_loss_func
    from megatron.early_exit.tuning.teacher_cache import write_cache

    run = _run(tune_exit=True, train_iters=1)
    run.checkpoint.load = "unused"
    run.validate()
    model = _build(run)
    freeze_backbone(model)
    b = _batch()
    with torch.no_grad():  # the EE-Tuning schedule runs the backbone without autograd
        out_ce = model(b.tokens, b.position_ids, None, labels=b.labels)
        out_kd = model(b.tokens, b.position_ids, None)
    ce = _grads(model, make_exit_tuning_loss_func(b, model, WEIGHTS, False, True), out_ce)
    kd_loss = make_exit_tuning_loss_func(b, model, WEIGHTS, False, True, exit_distillation=True)
    kd = _grads(model, kd_loss, out_kd)
    cache = tmp_path_factory.mktemp("cache") / "full"
    meta = write_cache(
        str(cache), model, {"train": (_Data(b), BATCH)}, run, VOCAB, "fp64", "test", log=repr
    )
    return {"run": run, "model": model, "batch": b, "ce": ce, "kd": kd, "dir": cache,
            "meta": meta}  # fmt: skip


def _cached_grads(setting, distill):
    from megatron.early_exit.tuning.teacher_cache import (
        TeacherCache,
        cached_forward,
        make_cached_loss_func,
    )

    run = setting["run"]
    model = setting["model"]
    cache = TeacherCache.open(str(setting["dir"]), run)
    cache.check_backbone(model, "test")
    train, valid = cache.datasets(run, BATCH)
    assert valid is None and len(train) == BATCH
    cb = train.batch([0, 1])
    loss_func = make_cached_loss_func(cb, model, WEIGHTS, False, exit_distillation=distill)
    return _grads(model, loss_func, cached_forward(model, cb))


def test_truncated_backbone_gives_the_same_exit_gradients(setting):
    from megatron.early_exit.tuning.session import (
        freeze_backbone,
        make_exit_tuning_loss_func,
        runtime_run,
        strip_lm_head,
    )

    run = setting["run"]
    run.training.tune_exit_truncate_backbone = True
    try:
        short_run = runtime_run(run)
    finally:
        run.training.tune_exit_truncate_backbone = False
    assert short_run.model.num_layers == max(EXITS) < run.model.num_layers
    short = _build(short_run)
    missing, unexpected = short.load_state_dict(setting["model"].state_dict(), strict=False)
    assert not missing and all(k.startswith(("decoder.layers.3", "decoder.final")) for k in
                               unexpected if "output_layer" not in k)  # fmt: skip
    strip_lm_head(short)
    freeze_backbone(short)
    b = setting["batch"]
    with torch.no_grad():
        out = short(b.tokens, b.position_ids, None, labels=b.labels)
    assert out.output.shape[-1] == run.model.hidden_size  # no LM head ran
    grads, metrics = _grads(short, make_exit_tuning_loss_func(b, short, WEIGHTS, False, False), out)
    ref_grads, ref_metrics = setting["ce"]
    assert set(metrics) == {"exit_1", "exit_3"}
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    for k in metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=0, atol=0)


def test_cache_at_full_k_gives_the_same_exit_gradients(setting):
    grads, metrics = _cached_grads(setting, distill=False)
    ref_grads, ref_metrics = setting["ce"]
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    grads, metrics = _cached_grads(setting, distill=True)
    ref_grads, ref_metrics = setting["kd"]
    assert max(float(ref_metrics[f"exit_kl_{n}"]) for n in EXITS) > 0.1  # not trivial
    for g, r in zip(grads, ref_grads, strict=True):
        assert r.abs().max() > 0
        # Today's KL runs in float32; the cached one in float64.
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    for k in ("exit_1", "exit_3", "exit_kl_1", "exit_kl_3"):
        torch.testing.assert_close(metrics[k].double(), ref_metrics[k].double(), rtol=1e-5, atol=0)


def test_sparse_top_k_teacher_keeps_the_tail_as_one_bucket(dist_world):
    from megatron.early_exit.model.gpt_model import vocab_parallel_top_k_kl
    from megatron.early_exit.tuning.teacher_cache import CachedBatch, cached_teacher

    g = torch.Generator().manual_seed(5)
    teacher = torch.log_softmax(3 * torch.randn(2, 4, 50, generator=g, dtype=torch.float64), -1)
    student = torch.randn(4, 2, 50, generator=g, dtype=torch.float64)
    values, ids = teacher.topk(5, dim=-1)  # cached layout: [b, s, k]
    batch = CachedBatch(None, None, {}, ids.int(), values)
    kl = vocab_parallel_top_k_kl(student, cached_teacher(batch, vocab_size=50))
    p = values.exp().transpose(0, 1)
    log_q = torch.log_softmax(student, -1)
    q_k = log_q.gather(-1, ids.transpose(0, 1)).exp()
    r, q_r = 1 - p.sum(-1), 1 - q_k.sum(-1)  # the tail bucket of teacher and student
    ref = (p * (p.log() - q_k.log())).sum(-1) + r * (r.log() - q_r.log())
    torch.testing.assert_close(kl.double(), ref, rtol=1e-6, atol=1e-9)


def test_mismatched_or_small_caches_are_refused(setting, tmp_path):
    from megatron.early_exit.errors import CheckpointError, ConfigError, DataError
    from megatron.early_exit.tuning.teacher_cache import TeacherCache

    run = setting["run"]
    meta_file = setting["dir"] / "meta.json"
    with pytest.raises(ConfigError, match="no meta.json"):
        TeacherCache.open(str(tmp_path), run)
    for key, value in (("exit_layer_nums", [2, 3]), ("seq_length", 32)):
        bad = tmp_path / key
        bad.mkdir()
        (bad / "meta.json").write_text(json.dumps({**setting["meta"], key: value}))
        with pytest.raises(ConfigError, match=f"{bad}/meta.json.*{key}"):
            TeacherCache.open(str(bad), run)
    cache = TeacherCache.open(str(setting["dir"]), run)
    run.training.train_iters = 2
    try:
        with pytest.raises(DataError, match=f"{meta_file} holds 2 train samples but .* 4"):
            cache.datasets(run, BATCH)
    finally:
        run.training.train_iters = 1
    other = _build(run)
    with torch.no_grad():
        other.decoder.layers[2].mlp.linear_fc1.weight[0, 0] += 1.0  # layer 3: an exit's input
    with pytest.raises(CheckpointError, match="another backbone"):
        cache.check_backbone(other, "elsewhere")


def test_flag_combinations_are_refused():
    from megatron.early_exit.config import ConfigError

    for training, parallel, match in (
        ({"tune_exit_truncate_backbone": True}, {}, "needs --tune-exit"),
        ({"teacher_cache": "d"}, {}, "needs --tune-exit"),
        ({"tune_exit": True, "teacher_cache": "d"}, {"tensor_model_parallel_size": 2},
         "--teacher-cache .* --tensor-model-parallel-size 1"),
        ({"tune_exit": True, "tune_exit_truncate_backbone": True},
         {"pipeline_model_parallel_size": 2}, "--tune-exit-pipeline-parallel-size k"),
    ):  # fmt: skip
        run = _run(**training)
        run.checkpoint.load = "ckpt"
        run.parallel.world_size = 2
        for k, v in parallel.items():
            setattr(run.parallel, k, v)
        with pytest.raises(ConfigError, match=match):
            run.validate()
    run = _run(tune_exit=True, tune_exit_truncate_backbone=True)
    run.checkpoint.load = "ckpt"
    run.exits.exit_distillation = True
    with pytest.raises(ConfigError, match="--tune-exit-truncate-backbone drops the final layer"):
        run.validate()


def test_cache_trains_confidence_heads_like_the_uncached_run(dist_world, tmp_path):
    """Confidence heads learn the final top-1; from the cache it is the top-k's first id."""
    from megatron.early_exit.tuning.session import freeze_backbone, make_exit_tuning_loss_func
    from megatron.early_exit.tuning.teacher_cache import (
        TeacherCache,
        cached_forward,
        make_cached_loss_func,
        write_cache,
    )

    run = _run(tune_exit=True, train_iters=1)
    run.exits.exit_confidence_head = True
    run.checkpoint.load = "unused"
    run.validate()
    model = _build(run)
    freeze_backbone(model)
    b = _batch()
    with torch.no_grad():
        out = model(b.tokens, b.position_ids, None)
    for distill in (False, True):
        ref, ref_metrics = _grads(
            model, make_exit_tuning_loss_func(b, model, WEIGHTS, False, True, distill), out
        )
        cache = tmp_path / f"distill{distill}"
        write_cache(str(cache), model, {"train": (_Data(b), BATCH)}, run, 8, "fp64", "t", repr)
        cb = TeacherCache.open(str(cache), run).datasets(run, BATCH)[0].batch([0, 1])
        loss = make_cached_loss_func(cb, model, WEIGHTS, False, exit_distillation=distill)
        grads, metrics = _grads(model, loss, cached_forward(model, cb))
        assert torch.equal(cb.topk_ids[..., 0].long(), out.output.argmax(-1))  # the target
        for n in EXITS:
            for key in (f"exit_conf_{n}", f"exit_agree_{n}"):
                torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=1e-12, atol=0)
        names = [name for name, _ in model.exit_heads.named_parameters()]
        assert any(".confidence." in name for name in names)
        for name, g, r in zip(names, grads, ref, strict=True):
            if distill and ".confidence." not in name:
                continue  # top-8 of 256 is a sparse teacher: only the estimators must agree
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-9, msg=name)
