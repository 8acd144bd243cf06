#!/usr/bin/env bash
# Wheels of the zoo's Python dependencies (torch excluded), for run.sh on a GPU machine that reaches no index.
#
#   bash benchmarks/gpu/make_wheelhouse.sh              # for this Python's version
#   bash benchmarks/gpu/make_wheelhouse.sh 3.10 3.12    # for the GPU image's Python version(s)
#
# Run it on a machine whose pip reaches an index. Versions are pinned to the ones installed here (those the
# tests pass with). It writes benchmarks/gpu/wheelhouse/ (git-ignored: a run on a device machine must carry
# it explicitly). run.sh installs from it, with --no-index, only the modules that are missing there.
# Binary wheels are manylinux x86_64; numpy alone is ~17 MB per Python version.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-$(command -v python || command -v python3)}
versions=("$@")
if ((${#versions[@]} == 0)); then
  versions=("$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')")
fi
mapfile -t pins < <("$PY" - <<'EOF'
from importlib.metadata import version

for name in ("transformers", "safetensors", "huggingface_hub", "tokenizers", "pyyaml", "tqdm", "numpy", "pytest"):
    print(f"{name}=={version(name)}")
EOF
)
echo "pins: ${pins[*]}"
for v in "${versions[@]}"; do
  echo "== Python $v"
  "$PY" -m pip download -q -d wheelhouse --only-binary=:all: --implementation cp --python-version "$v" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${pins[@]}"
done
du -sh wheelhouse
