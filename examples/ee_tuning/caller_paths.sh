# Sourced by the SmolLM2 recipes: `source "$(dirname "$0")/caller_paths.sh" VAR...`.
# The recipes run from any directory: a relative path given in one of the named variables
# (or a PY with a slash) is taken from where the script was called; then the shell moves to
# the repository root, where the defaults (under outputs/) and the tools live.
CALLER=$PWD
from_caller() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER" "$1" ;; esac; }
for v in "$@"; do
  if [ -n "${!v:-}" ]; then printf -v "$v" '%s' "$(from_caller "${!v}")"; fi
done
if [[ "${PY:-}" == */* ]]; then PY=$(from_caller "$PY"); fi
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-.venv/bin/python}
