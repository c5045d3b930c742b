#!/usr/bin/env bash
# GPU benchmark of trainctl (issue 11), in one go, offline, in under 8 minutes on one H100/H200:
#
#   1. GPT-2 small (124M, block 1024), gpt backend, bf16 + torch.compile: tokens/s and MFU,
#      a. train.parallel = "ddp" (the default; one process: no wrapper)
#      b. train.parallel = "fsdp" (FSDP2 over a group of one)
#   2. hf backend, random Qwen3-0.6B-shaped model, sequence 4096, BFD packing: tokens/s, peak memory
#   3. checkpoint save of GPT-2 small: loop blocked per save, sync vs
#      [plugin.checkpoint] async_save = true
#
# Usage (from anywhere; Python with torch, trainctl and trainctl[hf]'s dependencies installed:
# see docs/benchmarks.md, "GPU", for installing them from wheels without a network):
#
#   bench/gpu.sh                       # on the GPU; results in bench/results/gpu-*.json
#   bench/gpu.sh --cpu-smoke           # every step with tiny sizes on the CPU (tests/test_gpu_bench.py)
#   bench/gpu.sh --results DIR         # write the JSON results elsewhere
#   bench/gpu.sh --only gpt-ddp,ckpt   # some steps: gpt-ddp gpt-fsdp hf-qwen3 ckpt
#   GPU_BENCH_GPT_BATCH=32 GPU_BENCH_HF_BATCH=2 bench/gpu.sh   # micro-batch (default 16 and 4)
#   PYTHON=/opt/venv/bin/python bench/gpu.sh   # default: .venv/bin/python if there, else python3
#
# Each step prints one "gpu-bench: STEP: ..." result line and writes bench/results/gpu-STEP.json;
# a failed step does not stop the others. Every step has a time limit inside a 450 s budget; a
# step left without time is "skipped". Exit status: 0 when every step is ok, 1 when one failed or
# was skipped, 2 on bad usage, a missing package or no visible GPU.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # scripts/setup's
SMOKE=
RESULTS=bench/results
ONLY=gpt-ddp,gpt-fsdp,hf-qwen3,ckpt
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --results) [ $# -ge 2 ] || { echo "gpu.sh: --results needs a directory" >&2; exit 2; }; RESULTS=$2; shift ;;
    --only) [ $# -ge 2 ] || { echo "gpu.sh: --only needs a comma-separated list of steps" >&2; exit 2; }; ONLY=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1'; use --cpu-smoke, --results DIR, --only STEPS or --help" >&2; exit 2 ;;
  esac
  shift
done
[ -n "${ONLY//,/}" ] || { echo "gpu.sh: --only names no step; the steps are gpt-ddp, gpt-fsdp, hf-qwen3, ckpt" >&2; exit 2; }
for name in ${ONLY//,/ }; do
  case $name in gpt-ddp|gpt-fsdp|hf-qwen3|ckpt) ;;
    *) echo "gpu.sh: unknown step '$name' in --only; the steps are gpt-ddp, gpt-fsdp, hf-qwen3, ckpt" >&2; exit 2 ;;
  esac
done

# Nothing may reach the network; the checkout's trainctl comes first on the path.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CI=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$SMOKE" ]; then
  MODE=(--smoke); BUDGET=${GPU_BENCH_BUDGET_S:-300}; LIMIT_GPT=120; LIMIT_HF=120; LIMIT_CKPT=120
else
  MODE=(); BUDGET=${GPU_BENCH_BUDGET_S:-450}; LIMIT_GPT=140; LIMIT_HF=150; LIMIT_CKPT=150
fi

missing=$("$PY" - <<'EOF' 2>&1
import importlib.util
names = ["torch", "numpy", "pluggy", "structlog", "click", "safetensors", "prometheus_client",
         "transformers", "trl", "accelerate", "datasets", "peft", "tokenizers", "yaml"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
) || { echo "gpu.sh: $PY does not run: $missing" >&2; exit 2; }
if [ -n "$missing" ]; then
  echo "gpu.sh: missing Python packages: $missing; install them offline with" \
       "pip install --no-index --find-links wheels/ 'trainctl[hf]' (scripts/gpu-wheels makes wheels/)" >&2
  exit 2
fi
if [ -z "$SMOKE" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: no CUDA GPU visible to $PY; on a machine without one run: bench/gpu.sh --cpu-smoke" >&2
  exit 2
fi

mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
declare -a NAMES=() STATUSES=()

"$PY" - <<'EOF'
import torch, platform
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
print(f"gpu-bench: device {gpu} | torch {torch.__version__} | python {platform.python_version()}", flush=True)
EOF
[ -n "$SMOKE" ] && echo "gpu-bench: CPU smoke mode: tiny sizes, fp32, no compile; the numbers mean nothing"

# step NAME LIMIT_S SCRIPT ARGS...: run one step under a time limit; record its status
step() {
  local name=$1 limit=$2 left rc status
  shift 2
  case ",$ONLY," in *",$name,"*) ;; *) return ;; esac
  left=$((BUDGET - (SECONDS - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  rm -f "$RESULTS/gpu-$name.json"
  if [ "$limit" -lt 15 ]; then
    status="skipped"
    echo "gpu-bench: $name: SKIPPED: the ${BUDGET} s budget is spent"
  else
    echo "gpu-bench: --- $name (at most ${limit} s)"
    timeout --kill-after=10 "$limit" "$PY" "$@" ${MODE[@]+"${MODE[@]}"} --results "$RESULTS" --work "$WORK" \
      --timeout $((limit - 10)) >"$WORK/$name.log" 2>&1
    rc=$?
    grep '^gpu-bench: ' "$WORK/$name.log"
    case $rc in
      0) status="ok" ;;
      124|137) status="failed"; echo "gpu-bench: $name: FAILED: timed out after ${limit} s" ;;
      *) status="failed" ;;
    esac
    if [ "$status" = failed ]; then
      echo "gpu-bench: $name: last lines of its log:"; tail -n 15 "$WORK/$name.log" | sed 's/^/    /'
    fi
  fi
  if [ ! -s "$RESULTS/gpu-$name.json" ]; then  # skipped, or killed before it could write its own
    [ "$status" = skipped ] || status="failed"
    "$PY" -c 'import json, sys; print(json.dumps(dict(zip(["step", "status", "reason"], sys.argv[1:])), indent=1))' \
      "$name" "$status" "no result written (exit ${rc:-none}, limit ${limit} s, budget ${BUDGET} s)" >"$RESULTS/gpu-$name.json"
  fi
  NAMES+=("$name"); STATUSES+=("$status")
}

GPT_BATCH=(); [ -n "${GPU_BENCH_GPT_BATCH:-}" ] && GPT_BATCH=(--batch "$GPU_BENCH_GPT_BATCH")
HF_BATCH=(); [ -n "${GPU_BENCH_HF_BATCH:-}" ] && HF_BATCH=(--batch "$GPU_BENCH_HF_BATCH")
step gpt-ddp "$LIMIT_GPT" bench/gpu_gpt.py --parallel ddp ${GPT_BATCH[@]+"${GPT_BATCH[@]}"}
step gpt-fsdp "$LIMIT_GPT" bench/gpu_gpt.py --parallel fsdp ${GPT_BATCH[@]+"${GPT_BATCH[@]}"}
step hf-qwen3 "$LIMIT_HF" bench/gpu_hf.py ${HF_BATCH[@]+"${HF_BATCH[@]}"}
step ckpt "$LIMIT_CKPT" bench/gpu_ckpt.py

failed=0
for status in "${STATUSES[@]}"; do
  [ "$status" = ok ] || failed=1
done
"$PY" - "$RESULTS" "$((SECONDS - START))" "${SMOKE:-0}" "${NAMES[@]}" <<'EOF'
import json, sys
from pathlib import Path
results, seconds, smoke, names = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
steps = {n: json.loads((results / f"gpu-{n}.json").read_text()) for n in names}
print(f"gpu-bench: === summary ({seconds} s; results in {results})")
for n, s in steps.items():
    print(f"gpu-bench:   {n:<9} {s['status']}" + (f" ({s['reason']})" if s.get("reason") else ""))
summary = {"seconds": seconds, "smoke": smoke, "steps": {n: s["status"] for n, s in steps.items()}}
(results / "gpu-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
EOF
exit $failed
