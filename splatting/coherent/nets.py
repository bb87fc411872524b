"""Learned depth and flow networks from a local file: ONNX (onnxruntime) or TorchScript (torch.jit).

CoherentGS initialises from a monocular depth network and a learned optical flow; their weights
cannot be downloaded here, so the defaults are classical (plane-sweep stereo, OpenCV DIS flow) and
a user who has an exported network points ``coherent.depth_model`` / ``coherent.flow_model`` at it.

The calling conventions (those of the usual ONNX exports of MiDaS / Depth Anything and of RAFT):

* depth: one input ``float32 [1, 3, S, S]``, RGB in [0, 1] normalised by the ImageNet mean and
  standard deviation, ``S = coherent.depth_model_input``; one output ``[1, H', W']`` or
  ``[1, 1, H', W']``: relative disparity (``coherent.depth_model_output: disparity``) or depth.
* flow: two inputs ``float32 [1, 3, H, W]``, RGB in [0, 1], H and W rounded up to multiples of 8
  (edge padding); the last output ``[1, 2, H, W]``: the displacement (x, y) in pixels from the
  first image to the second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from perception3d.errors import DataError

__all__ = ["load_net", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_net(path: str | Path, field: str) -> Callable[..., np.ndarray]:
    """The network in ``path`` as ``f(*inputs: float32 arrays) -> float32 array`` (its last output).

    ``.onnx`` files run in onnxruntime (CPU); anything else is loaded as TorchScript.

    Raises:
        DataError: the file does not exist or is not a loadable network, naming ``field`` and the file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{field}={path}: file not found (an .onnx or TorchScript .pt network)")
    if p.suffix.lower() == ".onnx":
        try:
            import onnxruntime as ort

            session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise DataError(f"{field}={path}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        names = [i.name for i in session.get_inputs()]

        def run_onnx(*inputs: np.ndarray) -> np.ndarray:
            if len(inputs) != len(names):
                raise DataError(f"{field}={path}: the model takes {len(names)} input(s), {len(inputs)} given")
            return np.asarray(session.run(None, dict(zip(names, inputs)))[-1], np.float32)

        return run_onnx
    import torch

    try:
        module = torch.jit.load(str(p), map_location="cpu").eval()
    except Exception as e:  # torch.jit raises RuntimeError / ValueError / zipfile errors for bad files
        raise DataError(f"{field}={path}: not a loadable TorchScript model ({type(e).__name__}: {e})") from None

    def run_torch(*inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        if isinstance(out, (tuple, list)):
            out = out[-1]
        return out.float().numpy()

    return run_torch
