#!/usr/bin/env bash
# Installs what r1kit.rewards.sandbox needs to run model-written code (docs/CODE_SANDBOX.md):
# bubblewrap (`bwrap`), and, because runs started as root switch to an unprivileged uid that cannot
# execute an interpreter under /root, a system python3. Idempotent; never fails the set-up: without
# root or apt-get it prints a warning, and r1kit falls back to resource limits only (with a loud
# warning at run time).
set -u
missing=""
command -v bwrap >/dev/null 2>&1 || missing=" bubblewrap"
if [ "$(id -u 2>/dev/null)" = 0 ] && [ ! -x /usr/bin/python3 ]; then
  missing="$missing python3-minimal"
fi
[ -z "$missing" ] && exit 0
warn() { echo "warning: $1; r1kit may run model code WITHOUT namespace isolation. Install: apt-get install$missing" >&2; }
if [ "$(id -u 2>/dev/null)" != 0 ]; then
  warn "missing$missing and this set-up is not running as root"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  warn "missing$missing and apt-get is not available"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
apt-get install -y -q $missing >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $missing >/dev/null 2>&1; } \
  || warn "apt-get install$missing failed"
command -v bwrap >/dev/null 2>&1 && echo "sandbox: $(bwrap --version), $(/usr/bin/python3 --version 2>&1)"
exit 0
