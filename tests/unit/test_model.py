"""EarlyExitGPTModel semantics in one process (TP1PP1, gloo world of one)."""

import pytest
import torch

from tests.single_process import tp1pp1_world

pytestmark = pytest.mark.unit

VOCAB, SEQ, BATCH = 256, 16, 2


@pytest.fixture(scope="module")
def dist_world():
    yield from tp1pp1_world(seed=7)


def _model(**exit_kwargs):
    from megatron.early_exit.config import ExitConfig, RunConfig, build_transformer_config
    from megatron.early_exit.model import build_model

    run = RunConfig()
    run.data.mock_data, run.data.vocab_size = True, VOCAB
    run.model.seq_length = SEQ
    run.exits = ExitConfig(**exit_kwargs)
    run.validate()
    torch.manual_seed(0)
    model = build_model(build_transformer_config(run), VOCAB, SEQ, True, "learned_absolute").eval()
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return tokens, positions


def _layer_inputs(model, tokens, positions):
    """Hidden state entering every decoder layer, and the last layer's output."""
    h = model.embedding(input_ids=tokens, position_ids=positions)
    states = []
    for layer in model.decoder.layers:
        states.append(h)
        h, _ = layer(hidden_states=h, attention_mask=None)
    return states, h


@torch.no_grad()
def test_post_and_pre_exit_capture_the_right_hidden_states(dist_world):
    tokens, positions = _inputs()
    post = _model(exit_layer_nums=[1, 3])
    out = post(tokens, positions, None)
    inputs, last = _layer_inputs(post, tokens, positions)
    torch.testing.assert_close(out.exit_states[1].hidden, inputs[1], rtol=0, atol=0)
    torch.testing.assert_close(out.exit_states[3].hidden, inputs[3], rtol=0, atol=0)

    pre = _model(exit_layer_nums=[1, 3], pre_exit=True)
    out = pre(tokens, positions, None)
    inputs, _ = _layer_inputs(pre, tokens, positions)
    torch.testing.assert_close(out.exit_states[1].hidden, inputs[0], rtol=0, atol=0)
    torch.testing.assert_close(out.exit_states[3].hidden, inputs[2], rtol=0, atol=0)


@torch.no_grad()
def test_tied_exit_with_copied_final_norm_equals_lm_head(dist_world):
    """An exit after the last layer that copies the final norm is the LM head itself."""
    model = _model(exit_layer_nums=[4], use_exit_norm=True)
    head = model.exit_heads.get(4)
    head.norm.load_state_dict(model.decoder.final_layernorm.state_dict())
    tokens, positions = _inputs()
    out = model(tokens, positions, None)
    lm_logits = out.output  # [b, s, V] without labels
    exit_logits = model.exit_logits(4, out.exit_states[4]).transpose(0, 1)
    torch.testing.assert_close(exit_logits, lm_logits, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_temperature_divides_logits_and_max_prob_is_softmax_max(dist_world):
    from megatron.early_exit.model.gpt_model import vocab_parallel_max_prob

    tokens, positions = _inputs()
    plain = _model(exit_layer_nums=[2], untie_exit_output_weights=True)
    hot = _model(exit_layer_nums=[2], untie_exit_output_weights=True, exit_layer_temperature=[4.0])
    hot.load_state_dict(plain.state_dict())
    state = plain(tokens, positions, None).exit_states[2]
    a = plain.exit_logits(2, state)
    b = hot.exit_logits(2, hot(tokens, positions, None).exit_states[2])
    torch.testing.assert_close(b, a / 4.0)
    torch.testing.assert_close(vocab_parallel_max_prob(a), torch.softmax(a, -1).max(-1).values)


def test_exit_loss_is_cross_entropy_of_exit_logits(dist_world):
    model = _model(exit_layer_nums=[2], use_exit_mlp=True)
    tokens, positions = _inputs()
    labels = torch.roll(tokens, -1, dims=1)
    out = model(tokens, positions, None, labels=labels)
    assert model.exit_loss(2, out.exit_states[2], labels)[1] is None  # only when asked
    out = model(tokens, positions, None, labels=labels)
    loss, max_prob = model.exit_loss(2, out.exit_states[2], labels, with_max_prob=True)
    logits = model.exit_logits(2, out.exit_states[2]).transpose(0, 1).float()  # [b, s, V]
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none"
    ).view(BATCH, SEQ)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(max_prob, torch.softmax(logits, -1).max(-1).values)
    assert model.exit_heads.get(2).mlp is not None


def test_checkpoint_keys_use_global_layer_numbers(dist_world):
    model = _model(exit_layer_nums=[2, 4], use_exit_norm=True)
    keys = set(model.sharded_state_dict().keys())
    assert {"exit_heads.2.norm.weight", "exit_heads.4.norm.weight"} <= keys
