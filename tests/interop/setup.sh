#!/usr/bin/env bash
# Installs the interop test clients we did not write, pinned, into
#   target/interop/venv  (Python: requirements.txt)
#   target/interop/node  (Node:   package.json + package-lock.json)
# Safe to run from many test processes at once (one flock) and cheap when
# nothing changed (a stamp holds the hash of the pins). Used by
# tests/support/interop.rs and by .ci/run, so CI installs outside test
# timeouts and a developer's `cargo test` installs on first use.
# Usage: setup.sh [python|node|all] [TARGET_DIR]   (default: all <repo>/target)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
what="${1:-all}"
target="${2:-$here/../../target}"
case "$what" in python|node|all) ;; *) echo "usage: $0 [python|node|all] [TARGET_DIR]" >&2; exit 2;; esac
out="$target/interop"
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

stamp_of() { cat "$here/$1" | sha256sum | cut -d' ' -f1; }

py_stamp="$(stamp_of requirements.txt)"
if [ "$what" != node ] && [ "$(cat "$out/venv/.stamp" 2>/dev/null)" != "$py_stamp" ]; then
  rm -rf "$out/venv"
  if ! python3 -m venv "$out/venv" >/dev/null 2>"$out/venv.err"; then
    echo "cannot create a Python venv with $(command -v python3 || echo 'no python3'):" >&2
    cat "$out/venv.err" >&2
    echo "hint: install python3 and python3-venv (apt-get install python3-venv)" >&2
    exit 1
  fi
  rm -f "$out/venv.err"
  "$out/venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
  echo "$py_stamp" > "$out/venv/.stamp"
fi

node_stamp="$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [ "$what" != python ] && [ "$(cat "$out/node/.stamp" 2>/dev/null)" != "$node_stamp" ]; then
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "node and npm are needed for the Node interop tests and are not on PATH" >&2
    echo "hint: apt-get install nodejs npm (.ci/run does this)" >&2
    exit 1
  fi
  rm -rf "$out/node"
  mkdir -p "$out/node"
  cp "$here/package.json" "$here/package-lock.json" "$out/node/"
  # No install scripts: the two packages are plain JavaScript.
  (cd "$out/node" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$node_stamp" > "$out/node/.stamp"
fi
