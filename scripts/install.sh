#!/usr/bin/env bash
# Install everything the toolkit needs on a fresh Debian/Ubuntu machine (CPU-only is fine).
#   bash scripts/install.sh                # system packages + the toolkit with the viewer and test extras
#   bash scripts/install.sh --nerfstudio   # also the nerfstudio plugin's environment, .venv-nerfstudio
# Safe to re-run: already-installed pieces are skipped by apt and pip.
set -euo pipefail
cd "$(dirname "$0")/.."

NERFSTUDIO=0
for arg in "$@"; do
  case "$arg" in
    --nerfstudio) NERFSTUDIO=1 ;;
    *) echo "error: scripts/install.sh: unknown option '$arg' (known: --nerfstudio)" >&2; exit 2 ;;
  esac
done

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
# open3d imports need libusb; its offscreen renderer (`p3d view --screenshot`) runs on Mesa's software
# Vulkan (libvulkan1, mesa-vulkan-drivers) where there is no GPU; g++ builds the C++ CPU rasterizer
# of splatting/ (compiled once, below); the tests look at the HTML reports in a real browser (chromium).
PKGS="libusb-1.0-0 libgomp1 libegl1 libgl1 libvulkan1 mesa-vulkan-drivers g++ chromium"
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
# nuscenes-devkit 1.2.0: the official code tests/perception3d/test_metrics_nuscenes.py checks
# perception3d.metrics.nuscenes against. --no-deps: it pins numpy<2 and Shapely~=2.0.3, which would
# downgrade what torch, scipy, numba and spconv need; its evaluation code runs on numpy 2. Its
# import chain (nuscenes/__init__ loads the NuScenes class) needs only the four packages below.
$PY -m pip install -q --disable-pip-version-check "pyquaternion>=0.9.5" cachetools \
  "opencv-python-headless>=4.10" scikit-learn
$PY -m pip install -q --disable-pip-version-check --no-deps "nuscenes-devkit==1.2.0"
# The KITTI devkit's python port (OpenPCDet's kitti_object_eval_python, as mmdetection3d 1.4.0 ships
# it): the oracle tests/perception3d/test_metrics_kitti.py checks perception3d.metrics.kitti against.
# Only its two numba files are used, loaded by path from a folder of their own, off sys.path, so
# the wheel goes there without its dependencies (mmcv and others, which need a CUDA build).
ORACLES="$HOME/.cache/perception3d/oracles"
if [ ! -f "$ORACLES/mmdet3d-1.4.0/mmdet3d/evaluation/functional/kitti_utils/eval.py" ]; then
  $PY -m pip install -q --disable-pip-version-check --no-deps --target "$ORACLES/mmdet3d-1.4.0" "mmdet3d==1.4.0"
fi
$PY -c "import torch, spconv.pytorch, perception3d; print('[install] ok: torch', torch.__version__)"
# Build the CPU rasterizer now (about a minute, cached in ~/.cache/torch_extensions) rather than
# inside the first training run or test.
$PY -c "from splatting._ext import cpu_ext; cpu_ext(); print('[install] ok: CPU rasterizer built')"

# The nerfstudio plugin (splatting/ns_plugin.py) runs in an environment of its own: nerfstudio 1.1.5
# needs numpy<2 and torchvision, and no torchvision build imports beside the CPU torch 2.13 above.
# torch 2.14.1 + torchvision 0.29.1 is a CUDA build (it runs on the CPU too): about 8 GB, 3-4 minutes.
# `pip install -e .` there registers our methods with nerfstudio (setup.py's entry points).
if [ "$NERFSTUDIO" = 1 ]; then
  NS=.venv-nerfstudio
  [ -x "$NS/bin/python" ] || $PY -m venv "$NS"
  "$NS/bin/python" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" "nerfstudio==1.1.5"
  "$NS/bin/python" -m pip install -q --disable-pip-version-check -e .
  "$NS/bin/python" -c "from splatting._ext import cpu_ext; cpu_ext(); import splatting.ns_plugin; print('[install] ok: nerfstudio environment $NS')"
fi
