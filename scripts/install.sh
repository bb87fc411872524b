#!/usr/bin/env bash
# Install everything the toolkit needs on a fresh Debian/Ubuntu machine (CPU-only is fine).
#   bash scripts/install.sh          # system packages + the toolkit with the viewer and test extras
# Safe to re-run: already-installed pieces are skipped by apt and pip.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
# open3d imports need libusb; its headless renderers need EGL/GL (see DESIGN.md); g++ builds the
# C++ CPU rasterizer of splatting/ (compiled once, below).
PKGS="libusb-1.0-0 libgomp1 libegl1 libgl1 g++"
missing=$(for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  echo "[install] apt-get install $missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
# Pin the CPU build of torch first: an unpinned requirement would pull a multi-GB CUDA build.
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[viewer,test]"
$PY -c "import torch, spconv.pytorch, perception3d; print('[install] ok: torch', torch.__version__)"
# Build the CPU rasterizer now (about a minute, cached in ~/.cache/torch_extensions) rather than
# inside the first training run or test.
$PY -c "from splatting._ext import cpu_ext; cpu_ext(); print('[install] ok: CPU rasterizer built')"
