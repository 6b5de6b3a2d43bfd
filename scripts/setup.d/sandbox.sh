#!/usr/bin/env bash
# Installs bubblewrap (`bwrap`), the isolation tool r1kit.rewards.sandbox runs model-written code
# in (see docs/CODE_SANDBOX.md). Idempotent; never fails the set-up: without root or apt-get it
# prints a warning, and r1kit falls back to resource limits only (with a loud warning at run time).
set -u
if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi
warn() { echo "warning: $1; r1kit will run model code WITHOUT namespace isolation. Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)." >&2; }
if [ "$(id -u)" != 0 ]; then
  warn "bubblewrap is missing and this set-up is not running as root"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  warn "bubblewrap is missing and apt-get is not available"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q bubblewrap >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; } \
  || warn "apt-get install bubblewrap failed"
command -v bwrap >/dev/null 2>&1 && echo "bubblewrap installed: $(bwrap --version)"
exit 0
