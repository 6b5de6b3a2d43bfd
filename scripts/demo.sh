#!/usr/bin/env bash
# A demo on the embedded model, evaluated before and after on held-out problems never used in training.
# Usage: scripts/demo.sh [RUN_DIR] [PRESET] [TRAINER]
#   TRAINER = sft (default) | grpo
#   PRESET  = cpu_gsm8k      (default, sft: `make demo`, the GSM8K target: cold-start SFT on 1,024
#                             GSM8K-train worked solutions, greedy evaluation on all 1,319 test problems)
#           | cpu_demo       (grpo: `make demo-svamp`, GRPO alone on SVAMP one-step word problems)
#           | cpu_demo_gsm8k (grpo: `make demo-grpo-gsm8k`, GRPO alone on GSM8K: no learning signal)
# Rerunning with the same RUN_DIR resumes from its last checkpoint (one stopped before its first
# checkpoint starts over, its held-out before-evaluation reused).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/demo}
preset=${2:-cpu_gsm8k}
trainer=${3:-sft}
extra=()
if [ -d "$run" ] && ls "$run"/checkpoint-* >/dev/null 2>&1; then
  echo "resuming the run in $run (delete it to start over)"
  extra+=(--resume)
elif [ -f "$run/metrics.jsonl" ] || [ -f "$run/samples.jsonl" ]; then
  # stopped before its first checkpoint: nothing to resume; start over, keeping eval/before.json (reused)
  echo "$run holds no checkpoint: starting it over (its metrics.jsonl and samples.jsonl removed)"
  rm -f "$run/metrics.jsonl" "$run/samples.jsonl"
fi
start=$(date +%s)
.venv/bin/r1kit train "$trainer" --preset "$preset" --output "$run" --eval-before true --eval-after true "${extra[@]}"
echo "demo finished in $(( ($(date +%s) - start) / 60 )) min; see $run/eval/report.md, $run/curves.png, $run/metrics.jsonl"
