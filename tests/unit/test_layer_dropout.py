"""Layer dropout (LayerSkip) and exit-loss curricula: schedules, decisions, model effect."""

from __future__ import annotations

import pytest
import torch

from megatron.early_exit.config import ExitConfig, LayerDropoutConfig
from megatron.early_exit.errors import ConfigError
from megatron.early_exit.model.layer_dropout import LayerDropout, depth_scale, time_scale
from megatron.early_exit.pipeline.loss_weights import ExitLossWeights
from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

VOCAB, SEQ, BATCH, LAYERS = 128, 8, 2, 4


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=3)


def test_depth_and_time_scales_follow_the_documented_formulas():
    assert [depth_scale("uniform", n, 5) for n in range(1, 6)] == [1.0] * 5
    assert [depth_scale("linear", n, 5) for n in range(1, 6)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    exp = [depth_scale("exponential", n, 5) for n in range(1, 6)]
    assert exp == pytest.approx([2**r - 1 for r in (0.0, 0.25, 0.5, 0.75, 1.0)], abs=1e-15)
    assert time_scale("constant", 3, 10) == 1.0
    assert time_scale("linear", 0, 11) == 0.0 and time_scale("linear", 5, 11) == 0.5
    assert time_scale("exponential", 10, 11) == 1.0 and time_scale("exponential", 0, 11) == 0.0
    d = LayerDropout(LayerDropoutConfig(0.2, "linear", "linear"), 5, 11, seed=1)
    assert d.probability(5, 5) == pytest.approx(0.2 * 1.0 * 0.5)
    assert d.probability(1, 10) == 0.0


def test_decisions_are_seeded_and_match_the_rate():
    cfg = LayerDropoutConfig(0.5, "uniform", "constant")
    a, b = LayerDropout(cfg, 4, 100, seed=9), LayerDropout(cfg, 4, 100, seed=9)
    runs = [a.dropped_layers(t) for t in range(500)]
    assert runs == [b.dropped_layers(t) for t in range(500)]  # same seed: same layers
    assert runs != [LayerDropout(cfg, 4, 100, seed=10).dropped_layers(t) for t in range(500)]
    share = sum(len(r) for r in runs) / (500 * 4)
    assert 0.45 < share < 0.55
    none = LayerDropout(LayerDropoutConfig(0.0), 4, 100, seed=9)
    assert all(not none.dropped_layers(t) for t in range(100))


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        (dict(layer_dropout_rate=1.5), "--layer-dropout-rate"),
        (dict(layer_dropout_rate=0.1, layer_dropout_depth_scale="cubic"), "depth-scale"),
        (dict(layer_dropout_rate=0.1, layer_dropout_time_scale="cubic"), "time-scale"),
    ],
)
def test_bad_dropout_settings_name_the_flag(kwargs, bad):
    with pytest.raises(ConfigError, match=bad):
        LayerDropoutConfig(**kwargs).validate()


def _weights(curriculum, **kw):
    exits = ExitConfig(exit_layer_nums=[2, 4, 6], exit_loss_curriculum=curriculum, **kw)
    exits.validate(num_layers=8)
    return ExitLossWeights(exits, train_iters=9)


def test_rotational_curriculum_table():
    w = _weights("rotational", exit_loss_curriculum_period=2)
    assert w.at(0) == {2: 1.0, 4: 0.0, 6: 1.0}
    assert w.at(1) == {2: 0.0, 4: 1.0, 6: 0.0}
    assert w.at(2) == w.at(0)
    assert w.at(1, curriculum=False) == {2: 1.0, 4: 1.0, 6: 1.0}


def test_gradual_curriculum_table():
    # 3 exits over 9 iterations: deepest from 0, the middle one from 3, the shallowest from 6.
    w = _weights("gradual")
    on = {t: [n for n, v in w.at(t).items() if v > 0] for t in range(9)}
    assert on == {0: [6], 1: [6], 2: [6], 3: [4, 6], 4: [4, 6], 5: [4, 6]} | {
        t: [2, 4, 6] for t in (6, 7, 8)
    }
    g = _weights("gradual", exit_loss_curriculum_iters=3)
    assert [n for n, v in g.at(1).items() if v > 0] == [4, 6]


def test_curriculum_needs_exits():
    with pytest.raises(ConfigError, match="--exit-loss-curriculum"):
        ExitConfig(exit_loss_curriculum="gradual").validate(num_layers=4)


def _model():
    from megatron.early_exit.config import RunConfig, build_transformer_config
    from megatron.early_exit.model import build_model

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, VOCAB
    run.model.seq_length, run.model.num_layers = SEQ, LAYERS
    run.model.hidden_dropout = run.model.attention_dropout = 0.0
    run.exits = ExitConfig(exit_layer_nums=[2])
    run.validate()
    torch.manual_seed(0)
    return build_model(build_transformer_config(run), VOCAB, SEQ, True, "learned_absolute")


def _forward(model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    return model(tokens, positions, mask)


class _Fixed(LayerDropout):
    """Drops exactly the given layers (the model-level test needs a known set)."""

    def __init__(self, layers):
        super().__init__(LayerDropoutConfig(1.0), LAYERS, 10, seed=0)
        self.layers = set(layers)

    def drops(self, layer_number, iteration):
        return layer_number in self.layers


def test_a_dropped_layer_is_the_identity_and_gets_no_gradient(dist_world):
    model, zeroed = _model().train(), _model().eval()  # same seed: same weights
    with torch.no_grad():  # layer 3 with every parameter 0 adds exactly 0 to the residual
        for p in zeroed.decoder.layers[2].parameters():
            p.zero_()
    assert _Fixed([3]).install([model]) == LAYERS
    out = _forward(model)
    ref = _forward(zeroed)
    torch.testing.assert_close(out.output, ref.output, rtol=0, atol=0)
    torch.testing.assert_close(out.exit_states[2].hidden, ref.exit_states[2].hidden, rtol=0, atol=0)
    out.output.float().square().mean().backward()
    assert all(p.grad is None for p in model.decoder.layers[2].parameters())
    assert all(p.grad is not None for p in model.decoder.layers[1].parameters())
    # eval() never drops: the output differs from the zeroed model again.
    with torch.no_grad():
        assert not torch.equal(_forward(model.eval()).output, ref.output)


def test_rate_zero_is_bit_identical(dist_world):
    plain, wrapped = _model().train(), _model().train()
    LayerDropout(LayerDropoutConfig(0.0), LAYERS, 10, seed=0).install([wrapped])
    a, b = _forward(plain), _forward(wrapped)
    torch.testing.assert_close(a.output, b.output, rtol=0, atol=0)
    a.output.float().square().mean().backward()
    b.output.float().square().mean().backward()
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
