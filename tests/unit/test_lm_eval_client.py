"""lm-evaluation-harness's `local-completions` model scores a local loglikelihood task
against our live server (the tiny engine, in process) and gets the loglikelihoods the
engine's full model gives directly."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_inference import VOCAB
from tests.unit.test_server_logprobs import _ref, served  # noqa: F401  (fixture)

pytestmark = pytest.mark.unit

DOCS = [
    {"context": "5 17 42", "choices": ["7 9 3", "8", "60 61"], "label": 0},
    {"context": "1 2 3 4", "choices": ["5", "6 7"], "label": 1},
    {"context": "60 61 12 13 40", "choices": ["41 42 8", "9 90", "3"], "label": 2},
]


def _hf_tokenizer(out_dir):
    """An HF tokenizer with our NullTokenizer's ids: each integer word is its own id."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({str(i): i for i in range(VOCAB)}, unk_token="0"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=str(VOCAB - 1))
    fast.save_pretrained(out_dir)
    return str(out_dir)


def _task(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "ee_tiny.yaml").write_text(
        "task: ee_tiny_loglikelihood\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n"
    )
    return str(tmp_path / "tasks")


def test_lm_eval_local_completions_matches_the_engine(served, tmp_path, monkeypatch):  # noqa: F811
    import lm_eval  # pinned in requirements.txt (lm_eval[api])
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    port, engine = served
    model_args = (
        f"base_url=http://127.0.0.1:{port}/v1/completions,model=early-exit-gpt,"
        f"tokenizer={_hf_tokenizer(tmp_path / 'tok')},tokenizer_backend=huggingface,"
        "tokenized_requests=True,num_concurrent=1,max_retries=1"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["ee_tiny_loglikelihood"],
        task_manager=TaskManager(include_path=_task(tmp_path), include_defaults=False),
        log_samples=True,
        limit=None,
    )
    samples = sorted(results["samples"]["ee_tiny_loglikelihood"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for doc, sample in zip(DOCS, samples):
        ctx = [int(t) for t in doc["context"].split()]
        got = [r[0][0] for r in sample["resps"]]  # (loglikelihood, is_greedy) per choice
        want = []
        for choice in doc["choices"]:
            cont = [int(t) for t in choice.split()]
            ref = _ref(engine, ctx + cont)  # row t: log p(next token | tokens <= t)
            want.append(sum(float(ref[len(ctx) + j - 1, c]) for j, c in enumerate(cont)))
        assert got == pytest.approx(want, abs=1e-4), (doc, got, want)
        assert len(set(want)) == len(want)  # the choices are told apart
    acc = results["results"]["ee_tiny_loglikelihood"]["acc,none"]
    best = [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]
    assert acc == pytest.approx(sum(b == d["label"] for b, d in zip(best, DOCS)) / len(DOCS))
