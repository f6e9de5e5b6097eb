#!/usr/bin/env bash
# The prepared GPU check: one command on a machine with one NVIDIA GPU, about 8 minutes.
#
#   bash bench/gpu.sh                  # from the repository root; PY=... to use another Python
#
# It checks what is there first and stops with one line when something is missing (no GPU, no torch
# that sees it, mtpd not importable). Then, each under its own time limit:
#   1. the CUDA-marked tests (decode on the GPU against the CPU, ...);
#   2. bench/step.py on cuda: undistilled / online / cached steps, AMP off, then bf16 with channels-last;
#   3. bench/build.py on cuda: build against teacher-only time, AMP off and fp16;
#   4. a two-process torchrun stage on the one GPU (nccl, else gloo).
# Everything printed goes to $OUT/gpu.log (OUT defaults to bench_out/gpu) and the tables into
# bench/RESULTS.md's "GPU" section.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench_out/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }
stop() { say "gpu.sh: $*"; exit 2; }

command -v nvidia-smi >/dev/null 2>&1 || stop "no nvidia-smi on this machine: not a GPU machine"
[ -x "$PY" ] || PY=$(command -v python3) || stop "no Python: set PY=/path/to/python (with torch and mtpd's requirements)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || stop "torch at $PY does not see a CUDA device ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import mtpd.trainer.stage, mtpd.cache.build" 2>>"$LOG" || stop "mtpd does not import with $PY: see $LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

run() {  # run SECONDS NAME COMMAND...: one step, its output kept, its end (and time-out) said
  local limit=$1 name=$2
  shift 2
  say "== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt" >>"$LOG"
  local rc=${PIPESTATUS[0]}
  say "== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (timed out)')"
}

run 120 cuda_tests "$PY" -m pytest -q -rs -m cuda tests
run 100 step_fp32 "$PY" bench/step.py --device cuda --rounds 3 --budget-min 1.2 --no-write
run 100 step_bf16 "$PY" bench/step.py --device cuda --amp bf16 --channels-last --rounds 3 --budget-min 1.2 --no-write
run 80 build_fp32 "$PY" bench/build.py --device cuda --rounds 2 --budget-min 1.0 --no-write
run 80 build_fp16 "$PY" bench/build.py --device cuda --amp fp16 --rounds 2 --budget-min 1.0 --no-write

# 4. two processes on one GPU: a tiny digits set, a store, a one-epoch plan.
W="$OUT/ddp"
rm -rf "$W" && mkdir -p "$W"
"$PY" -c "from mtpd.cli.data import main; raise SystemExit(main())" digits --out "$W/digits" --train 64 --val 16 --size 128 --seed 0 >>"$LOG" 2>&1
"$PY" -c "from mtpd.cli.cache import main; raise SystemExit(main())" build --teacher retinanet_tiny --weights none --ann "$W/digits/annotations/instances_train.json" \
  --images "$W/digits/images/train" --short 128 --long 128 --views orig,hflip --out "$W/store" --workers 0 \
  --device cuda --no-progress >>"$LOG" 2>&1
cat >"$W/plan.yaml" <<EOF
student: {arch: retinanet_tiny}
data: {train_ann: $W/digits/annotations/instances_train.json, train_images: $W/digits/images/train,
       short: 128, long: 128, batch_size: 8, workers: 1}
stages:
- {name: ddp, stores: [$W/store], losses: [{name: mgd, weight: 1.0e-4}], epochs: 1, eval: false,
   optimizer: {type: adamw, lr: 0.001}, schedule: {warmup_iters: 2}}
output_dir: $W/run
EOF
run 120 torchrun "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m mtpd.cli.train \
  --plan "$W/plan.yaml" --stage all --device cuda

"$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path

from bench.common import machine, write_section

out = Path(sys.argv[1])
parts = []
for name in ("cuda_tests", "step_fp32", "step_bf16", "build_fp32", "build_fp16", "torchrun"):
    f = out / f"{name}.txt"
    text = f.read_text().strip().splitlines()[-40:] if f.is_file() else ["(did not run)"]
    parts += [f"### {name}", "", "```", *text, "```", ""]
write_section("GPU", "\n".join([f"Command: `bash bench/gpu.sh`; machine: {machine()}", "", *parts]))
print("wrote bench/RESULTS.md's GPU section")
EOF
say "gpu.sh: done; the log is $LOG"
