#!/usr/bin/env bash
# GRPO on the embedded model, evaluated before and after on held-out problems never used in training.
# Usage: scripts/demo.sh [RUN_DIR] [PRESET]
#   PRESET = cpu_demo_gsm8k (default, `make demo`: the main job, GSM8K train → GSM8K test)
#          | cpu_demo       (`make demo-svamp`: SVAMP one-step word problems, where the 135M model
#                            has enough reward variance to learn in 30 minutes)
# Each preset caps training time (max_train_minutes) so the whole run fits in 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/demo}
preset=${2:-cpu_demo_gsm8k}
extra=()
if [ -d "$run" ] && ls "$run"/checkpoint-* >/dev/null 2>&1; then
  echo "resuming the run in $run (delete it to start over)"
  extra+=(--resume)
fi
start=$(date +%s)
.venv/bin/r1kit train grpo --preset "$preset" --output "$run" --eval-before true --eval-after true "${extra[@]}"
echo "demo finished in $(( ($(date +%s) - start) / 60 )) min; see $run/eval/report.md, $run/curves.png, $run/metrics.jsonl, $run/samples.jsonl"
