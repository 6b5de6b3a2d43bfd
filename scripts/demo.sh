#!/usr/bin/env bash
# The main job on the embedded model: GRPO with the cpu_demo preset, evaluated before and after on
# held-out problems never used in training. Usage: scripts/demo.sh [RUN_DIR] [TASK]
#   TASK = svamp (default: one-step word problems, where the 135M model has learning signal)
#        | gsm8k (the full GSM8K run: see README for what it achieves)
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/demo}
task=${2:-svamp}
extra=()
if [ "$task" = gsm8k ]; then
  extra=(--task gsm8k --eval-task gsm8k --eval-split test --max-completion-length 128 --eval-limit 200)
fi
if [ -d "$run" ] && ls "$run"/checkpoint-* >/dev/null 2>&1; then
  echo "resuming the run in $run (delete it to start over)"
  extra+=(--resume)
fi
start=$(date +%s)
.venv/bin/r1kit train grpo --preset cpu_demo --output "$run" --eval-before true --eval-after true "${extra[@]}"
echo "demo finished in $(( ($(date +%s) - start) / 60 )) min; see $run/eval/report.md, $run/curves.png, $run/metrics.jsonl, $run/samples.jsonl"
