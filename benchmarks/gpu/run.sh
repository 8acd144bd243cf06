#!/usr/bin/env bash
# The GPU check of issue 13, in one command, on a CUDA machine that has torch and this working tree:
#
#   bash benchmarks/gpu/run.sh            # the whole check, under 8 minutes (ZOO_GPU_BUDGET_S, default 450 s)
#   bash benchmarks/gpu/run.sh --smoke    # the same steps at toy sizes on the CPU (a check of this script)
#
# Parts, each a separate process under its own `timeout`, so that one hung part cannot eat the budget
# (benchmarks/gpu/gpu_bench.py --help describes them):
#   env (30 s)  tests: the CUDA parity tests (120 s)  train: bf16 training tokens/s + MFU (170 s)
#   moe: our MoE layer vs transformers' Mixtral block (100 s)  report (30 s, always runs)
# Results: $OUT/gpu_results.{json,md} when $OUT is set, else benchmarks/gpu/results.{json,md}; each part's raw
# JSON in the *_parts/ folder beside them and this script's output in the .log beside them.
# A part that fails, times out or lacks a dependency is reported as such; the others still run.
#
# Dependencies: only torch is assumed. The zoo's own (transformers, safetensors, huggingface_hub, pytest, ...)
# are checked; missing ones are installed from a local wheelhouse when there is one (ZOO_WHEELHOUSE, default
# benchmarks/gpu/wheelhouse, made by benchmarks/gpu/make_wheelhouse.sh on a machine with internet); pip is
# never allowed to reach an index. Whatever stays missing is printed and recorded in the results.
# Other settings: PYTHON (default python, else python3), ZOO_GPU_BUDGET_S, ZOO_GIT_COMMIT (recorded
# when there is no .git). Extra arguments go to every gpu_bench.py call (e.g. --smoke, --models ...).

set -uo pipefail  # no -e: a failing step is reported and the next one runs

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${ZOO_GPU_BUDGET_S:-450}
REPORT_RESERVE=30
if [[ -n ${OUT:-} ]]; then JSON="$OUT/gpu_results.json"; else JSON="benchmarks/gpu/results.json"; fi
[[ " $* " == *" --smoke "* ]] && JSON="${JSON%.json}_smoke.json"
PARTS_DIR="${JSON%.json}_parts"
EXTRA=("$@")
MODULES=(transformers safetensors huggingface_hub yaml tqdm numpy pytest)
declare -A PIP_NAME=([yaml]=pyyaml)

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the zoo packages, installed or not
export ZOO_GPU_COMMAND="bash benchmarks/gpu/run.sh${*:+ $*}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
ZOO_GIT_COMMIT=${ZOO_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
export ZOO_GIT_COMMIT
unset ZOO_FORCE_REFERENCE  # the fast paths are what is measured

if command -v timeout >/dev/null; then
  limited() { local seconds=$1; shift; timeout --kill-after=10 "$seconds" "$@"; }
else
  echo "warning: no coreutils timeout here; the parts run without a time limit"
  limited() { shift; "$@"; }
fi

missing_modules() {  # the MODULES that $PY cannot import
  local m out=()
  for m in "${MODULES[@]}"; do "$PY" -c "import $m" >/dev/null 2>&1 || out+=("$m"); done
  echo "${out[*]}"
}

install_dependencies() {
  local missing m out names=() wheelhouse=${ZOO_WHEELHOUSE:-benchmarks/gpu/wheelhouse}
  missing=$(missing_modules)
  if [[ -n $missing ]]; then
    echo "missing Python modules: $missing"
    if [[ -d $wheelhouse ]]; then
      for m in $missing; do names+=("${PIP_NAME[$m]:-$m}"); done
      echo "installing ${names[*]} from $wheelhouse (no index)"
      limited 120 "$PY" -m pip install -q --no-index --find-links "$wheelhouse" "${names[@]}" \
        || echo "warning: the wheelhouse install failed (see above)"
    else
      echo "no wheelhouse at $wheelhouse: they stay missing (make one with benchmarks/gpu/make_wheelhouse.sh)"
    fi
  fi
  if ! "$PY" -c "import transformers" >/dev/null 2>&1; then
    echo "transformers is missing: trying pip install -e . --no-deps (offline)"
    if ! out=$(limited 60 "$PY" -m pip install -q -e . --no-deps --no-build-isolation --no-index 2>&1); then
      echo "$out" | grep -iE "^error|error:" | tail -3
      echo "warning: pip install -e . --no-deps failed; the zoo is imported from PYTHONPATH=$PWD"
    fi
  fi
  missing=$(missing_modules)
  if [[ -z $missing ]]; then
    echo "all Python dependencies present"
    return
  fi
  echo "STILL MISSING: $missing"
  [[ $missing == *transformers* ]] && echo "  -> the zoo cannot be imported: parts train and moe will report the ImportError"
  [[ $missing == *pytest* ]] && echo "  -> part tests cannot run the CUDA parity tests"
}

run_part() {  # name, timeout in seconds; the budget left can shorten it
  local name=$1 limit=$2 left=$((BUDGET - REPORT_RESERVE - SECONDS)) start=$SECONDS rc own=()
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "== part $name: skipped, the ${BUDGET}s budget is spent"
    echo skipped >"$PARTS_DIR/$name.rc"
    return
  fi
  echo "== part $name (timeout ${limit}s)"
  # pytest gets its own, shorter limit, so that the part can still say it timed out and which tests ran
  [[ $name == tests ]] && own=(--tests-timeout $((limit - 15)))
  limited "$limit" "$PY" benchmarks/gpu/gpu_bench.py --part "$name" --json "$JSON" ${own[@]+"${own[@]}"} \
    ${EXTRA[@]+"${EXTRA[@]}"}
  rc=$?
  echo "$rc" >"$PARTS_DIR/$name.rc"
  echo "== part $name: exit status $rc after $((SECONDS - start))s"
}

main() {
  local rc
  echo "== GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), in $PWD, results in $JSON"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  if ! "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA",
torch.version.cuda, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'; then
    echo "error: torch cannot be imported with ${PY:-python}"
    return 1
  fi
  install_dependencies
  run_part env 30
  run_part tests 120
  run_part train 170
  run_part moe 100
  echo "== report"
  limited "$REPORT_RESERVE" "$PY" benchmarks/gpu/gpu_bench.py --part report --json "$JSON" ${EXTRA[@]+"${EXTRA[@]}"}
  rc=$?
  [[ -f ${JSON%.json}.md ]] && cat "${JSON%.json}.md"
  echo "== done in ${SECONDS}s: $JSON, ${JSON%.json}.md (report exit status $rc)"
  return "$rc"
}

mkdir -p "$PARTS_DIR" || exit 1
rm -f "$PARTS_DIR"/*.json "$PARTS_DIR"/*.rc "$PARTS_DIR"/*.xml
main 2>&1 | tee "${JSON%.json}.log"
exit "${PIPESTATUS[0]}"
