"""INT8 post-training quantization of the detectors (LiDAR-PTQ, Zhou et al., ICLR 2024; written
from the paper).

A trained detector is prepared once (`prepare`): every BatchNorm is folded into the convolution or
linear layer before it, and every convolution / linear layer (dense `Conv2d`, `ConvTranspose2d`,
`Linear`; sparse `SubMConv3d`, `SparseConv3d`) is wrapped in a `QuantLayer` that quantizes its
weight (INT8, symmetric, one scale per output channel) and its input activation (UINT8, affine,
one scale and zero point per tensor). Calibration (`calibrate`) runs the model on a few training
frames, records each layer's input values, and sets the activation ranges by one of:

* `minmax`: the smallest and largest value seen (the baseline);
* `entropy`: TensorRT's KL-divergence threshold on the histogram of the values (the baseline);
* `sparse` (LiDAR-PTQ's sparsity-based calibration): max-min over the **non-zero** values only,
  refined by a search over clipping ranges that minimises the quantization error of those values,
  so that the zeros of the scattered BEV map (empty pillars, most of the map) do not decide the
  scale.

This module simulates INT8 (fake quantization: values rounded to the INT8 grid and back), which
is what the accuracy of any INT8 kernel is; the model file (`save_quantized`) stores the weights as
int8 with their scales. Still to come (issue 52): the task-guided global positive loss, adaptive
rounding, real INT8 kernels for the dense part, and the QAT comparison.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from perception3d.errors import DataError
from perception3d.sparse import spconv

__all__ = ["METHODS", "QuantLayer", "prepare", "calibrate", "quant_layers", "save_quantized", "load_quantized",
           "is_quantized_file", "read_quantized_config", "QUANT_FORMAT", "export_dense_onnx", "OrtDense"]

METHODS = ("minmax", "entropy", "sparse")
QUANT_FORMAT = "perception3d-int8-1"
_SPARSE = (spconv.SubMConv3d, spconv.SparseConv3d)
_DENSE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_SAMPLES = 1 << 20  # activation values kept per layer for calibration (a uniform random subset)


def _out_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.ConvTranspose2d) else 0  # spconv's KRSC weights: out first


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module) -> None:
    """Fold `bn` (eval statistics) into `layer`'s weight and bias: `bn(layer(x)) == layer'(x)`."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shape = [1] * layer.weight.dim()
    shape[_out_axis(layer)] = -1
    layer.weight.mul_(s.reshape(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    layer.bias = nn.Parameter((bias - bn.running_mean) * s + bn.bias)


class QuantLayer(nn.Module):
    """A convolution or linear layer with INT8 weights and a UINT8 input (fake-quantized).

    Buffers: `w_scale [C_out]` (weight = round(w / w_scale) in [-127, 127] per output channel),
    `a_scale`, `a_zero` (input = round(x / a_scale) + a_zero in [0, 255]). `observe`: a callback
    that receives the float input during calibration (then nothing is quantized).
    """

    def __init__(self, layer: nn.Module, name: str):
        super().__init__()
        self.layer, self.name = layer, name
        self.sparse = isinstance(layer, _SPARSE)
        w = layer.weight.detach()
        axis = _out_axis(layer)
        amax = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(1)
        self.register_buffer("w_scale", (amax / 127).clamp(min=1e-12))
        self.register_buffer("a_scale", torch.tensor(1.0))
        self.register_buffer("a_zero", torch.tensor(0, dtype=torch.int32))
        self.observe: Callable[["QuantLayer", torch.Tensor], None] | None = None
        self.capture: Callable | None = None
        self.quantize_input = True

    def output(self, x, quantized: bool):
        """The layer's output for input `x` (a tensor, or a sparse tensor), its input quantized or not."""
        feats = x.features if self.sparse else x
        if quantized:
            feats = self.fake_quant(feats)
        out = self.layer(x.replace_feature(feats) if self.sparse else feats)
        return out.features if self.sparse else out

    def weight_int8(self) -> torch.Tensor:
        w = self.layer.weight.detach()
        shape = [1] * w.dim()
        shape[_out_axis(self.layer)] = -1
        return torch.clamp(torch.round(w / self.w_scale.reshape(shape)), -127, 127).to(torch.int8)

    def quantize_weight(self) -> None:
        """Round the layer's weight to its INT8 grid, in place (the weights a kernel would use)."""
        shape = [1] * self.layer.weight.dim()
        shape[_out_axis(self.layer)] = -1
        with torch.no_grad():
            self.layer.weight.copy_(self.weight_int8().float() * self.w_scale.reshape(shape))

    def set_range(self, lo: float, hi: float) -> None:
        """UINT8 affine parameters covering `[lo, hi]` (0 always representable exactly)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        self.a_scale.fill_(scale)
        self.a_zero.fill_(int(np.clip(round(-lo / scale), 0, 255)))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x.float(), float(self.a_scale), int(self.a_zero), 0, 255).to(x.dtype)

    def forward(self, x):
        feats = x.features if self.sparse else x
        if self.capture is not None:  # calibration: hand over the input itself, stop the model here
            self.capture(x)
            raise _Captured
        if self.observe is not None:
            self.observe(self, feats.detach())
        elif self.quantize_input:
            feats = self.fake_quant(feats)
        return self.layer(x.replace_feature(feats) if self.sparse else feats)


class _Captured(Exception):
    """Raised by a capturing `QuantLayer` to stop the forward pass once it holds its input."""


class _SparseQuantLayer(QuantLayer, spconv.SparseModule):
    """A `QuantLayer` around a sparse convolution: spconv's `SparseSequential` passes it the whole
    sparse tensor (as it does to spconv's own modules)."""


def prepare(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the layer before it and wrap every conv / linear layer in a
    `QuantLayer`, in place (the model must be in eval mode: folding uses the running statistics)."""
    if model.training:
        raise ValueError("prepare: put the model in eval mode first (BatchNorm folds its running statistics)")
    containers = [m for m in model.modules() if isinstance(m, (nn.Sequential, spconv.SparseSequential))]
    for seq in containers:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            layer, bn = seq._modules[a], seq._modules[b]
            if isinstance(layer, _SPARSE + _DENSE) and isinstance(bn, _BN):
                _fold(layer, bn)
                seq._modules[b] = nn.Identity()
    vfe = getattr(model, "vfe", None)
    if vfe is not None and hasattr(vfe, "linears"):
        for i, (lin, bn) in enumerate(zip(vfe.linears, vfe.norms)):
            _fold(lin, bn)
            vfe.norms[i] = nn.Identity()
    left = [n for n, m in model.named_modules() if isinstance(m, _BN)]
    if left:
        raise ValueError(f"prepare: BatchNorm layers not after a conv / linear layer: {left}")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, _SPARSE + _DENSE) and not isinstance(parent, QuantLayer):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                cls = _SparseQuantLayer if isinstance(child, _SPARSE) else QuantLayer
                parent._modules[child_name] = cls(child, name)
    return model


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


# -- calibration ------------------------------------------------------------------------------------
def _entropy_threshold(values: np.ndarray, bins: int = 2048, levels: int = 128) -> float:
    """TensorRT's calibration: the threshold T (on |x|) whose clipped, `levels`-level quantized
    histogram is closest in KL divergence to the full one."""
    a = np.abs(values)
    amax = float(a.max()) if a.size else 0.0
    if amax <= 0:
        return 0.0
    hist, edges = np.histogram(a, bins=bins, range=(0, amax))
    hist = hist.astype(np.float64)
    best, best_t = math.inf, amax
    for i in range(levels, bins + 1, 16):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()  # the clipped mass goes to the last bin
        # quantize bins [0, i) into `levels` groups, spreading each group's mass over its non-empty bins
        groups = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for g in groups:
            nz = hist[g] > 0
            if nz.any():
                q[g[nz]] = hist[g].sum() / nz.sum()
        p, q = ref / ref.sum(), q / max(q.sum(), 1e-12)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_t = kl, edges[i]
    return best_t


def _foreground(model: nn.Module, batches: list, threshold: float = 0.1, background: float = 0.01) -> list:
    """Per batch, a BEV weight map `[B, 1, H, W]` at the head's resolution: 1 where the float
    model's heatmap is confident (any class above `threshold`, dilated by one cell), `background`
    elsewhere. The task guidance of the clipping search: errors where objects are count."""
    maps: list = []
    hook = model.head.register_forward_hook(lambda m, i, out: maps.append(torch.sigmoid(out.heatmap.float())))
    try:
        for batch in batches:
            model(batch)
    finally:
        hook.remove()
    out = []
    for hm in maps:
        fg = nn.functional.max_pool2d((hm.amax(1, keepdim=True) > threshold).float(), 3, 1, 1)
        out.append(fg + background * (1 - fg))
    return out


def _weighted_error(out: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor | None) -> float:
    err = (out.float() - ref.float()).pow(2)
    if weight is None or err.dim() != 4:
        return float(err.sum())
    h, w = err.shape[-2:]
    wmap = (nn.functional.adaptive_max_pool2d(weight, (h, w)) if h <= weight.shape[-2]
            else nn.functional.interpolate(weight, size=(h, w), mode="nearest"))
    return float((err * wmap).sum())


def _refine_by_output(model: nn.Module, layers: list[QuantLayer], batches: list, facts: dict,
                      alphas=tuple(np.linspace(1.0, 0.3, 15))) -> None:
    """LiDAR-PTQ's clipping search, layer by layer in order: each layer's input is captured from the
    model with every earlier layer already quantized, and the clipping of its non-zero max-min
    range is chosen to minimise the squared error of the layer's output against its output on the
    unquantized input (weights still float: the activation's error alone), counted where the float
    model sees objects (`_foreground`; dense BEV layers; elsewhere every value counts). Then its
    weights are rounded, so later layers see what the INT8 model computes."""
    for layer in layers:
        layer.quantize_input = False
    weights = _foreground(model, batches) if hasattr(model, "head") else [None] * len(batches)
    for layer in layers:
        layer.quantize_input = True
    for layer in layers:
        captured: list = []
        layer.capture = captured.append
        try:
            for batch in batches:
                try:
                    model(batch)
                except _Captured:
                    pass
        finally:
            layer.capture = None
        lo0, hi0 = facts[layer.name]["lo"], facts[layer.name]["hi"]
        if captured and hi0 - lo0 > 0:
            refs = [layer.output(x, quantized=False) for x in captured]
            errors = []
            for a in alphas:
                layer.set_range(a * lo0, a * hi0)
                errors.append(sum(_weighted_error(layer.output(x, quantized=True), r, w)
                                  for x, r, w in zip(captured, refs, weights)))
            best = alphas[int(np.argmin(errors))]
            layer.set_range(best * lo0, best * hi0)
            facts[layer.name].update(lo=best * lo0, hi=best * hi0, clip=float(best))
        layer.quantize_weight()


class _Recorder:
    """Per layer: the extremes of all input values and of the non-zero ones; with `keep_samples`, a
    random subset of the values too (what the entropy calibration's histogram is built from)."""

    def __init__(self, keep_samples: bool, seed: int = 0):
        self.stats: dict[str, dict] = {}
        self.keep_samples = keep_samples
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, layer: QuantLayer, x: torch.Tensor) -> None:
        v = x.float().reshape(-1)
        st = self.stats.setdefault(layer.name, {"min": math.inf, "max": -math.inf, "nz_min": math.inf,
                                                "nz_max": -math.inf, "all": [], "n": 0, "n_nz": 0})
        nz = v[v != 0]
        st["n"] += v.numel()
        st["n_nz"] += nz.numel()
        if v.numel():
            st["min"], st["max"] = min(st["min"], float(v.min())), max(st["max"], float(v.max()))
        if nz.numel():
            st["nz_min"], st["nz_max"] = min(st["nz_min"], float(nz.min())), max(st["nz_max"], float(nz.max()))
        if self.keep_samples:
            if v.numel() > _SAMPLES // 8:
                v = v[torch.randint(0, v.numel(), (_SAMPLES // 8,), generator=self.gen)]
            st["all"].append(v.clone())

    def sample(self, name: str) -> torch.Tensor:
        t = torch.cat(self.stats[name]["all"]) if self.stats[name]["all"] else torch.zeros(1)
        if t.numel() > _SAMPLES:
            t = t[torch.randint(0, t.numel(), (_SAMPLES,), generator=self.gen)]
        return t


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, method: str, progress: Callable | None = None,
              search_frames: int = 4) -> dict:
    """Set every `QuantLayer`'s activation range from the model's inputs on `batches` (a prepared
    model, `prepare`), and round the weights to INT8. `sparse` searches each layer's clipping on the
    first `search_frames` batches (`_refine_by_output`). Returns per-layer calibration facts."""
    batches = list(batches)
    if method not in METHODS:
        raise DataError(f"quantization method {method!r}: expected one of {', '.join(METHODS)}")
    layers = quant_layers(model)
    if not layers:
        raise ValueError("calibrate: the model has no QuantLayer (call prepare first)")
    rec = _Recorder(keep_samples=method == "entropy")
    for layer in layers:
        layer.observe = rec
    try:
        for batch in batches:
            model(batch)
            if progress is not None:
                progress()
    finally:
        for layer in layers:
            layer.observe = None
    facts = {}
    for layer in layers:
        st = rec.stats.get(layer.name)
        if st is None:
            raise DataError(f"calibration: layer {layer.name} saw no input (no calibration frames reached it)")
        if method == "minmax":
            lo, hi = st["min"], st["max"]
        elif method == "entropy":
            t = _entropy_threshold(rec.sample(layer.name).numpy())
            lo, hi = max(st["min"], -t), min(st["max"], t)
        else:  # sparse: the non-zero values' max-min, refined below
            lo, hi = (min(st["nz_min"], 0.0), max(st["nz_max"], 0.0)) if st["n_nz"] else (0.0, 0.0)
        layer.set_range(lo, hi)
        facts[layer.name] = {"lo": lo, "hi": hi, "zero_fraction": 1 - st["n_nz"] / max(st["n"], 1),
                             "seen_min": st["min"], "seen_max": st["max"]}
    if method == "sparse":
        _refine_by_output(model, layers, batches[:search_frames], facts)
    else:
        for layer in layers:
            layer.quantize_weight()
    return facts


# -- files ------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, path: str | Path, config: dict, info: dict) -> Path:
    """Write a calibrated model as `.safetensors`: each quantized layer's weight as int8 with its
    per-channel scale, its input's scale and zero point; the rest (biases) as float32; the config
    and `info` (method, calibration frames, ...) as metadata."""
    from safetensors.torch import save_file

    from perception3d.io.atomic import atomic_path

    tensors, float_weights = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            tensors[f"{name}.weight_int8"] = module.weight_int8().contiguous()
            float_weights.add(f"{name}.layer.weight")  # stored as int8 above
    for key, value in model.state_dict().items():
        if key not in float_weights:
            tensors[key] = value.detach().float().contiguous() if value.is_floating_point() else value.contiguous()
    meta = {"format": QUANT_FORMAT, "config": json.dumps(config), "info": json.dumps(info)}
    out = Path(path)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out


def is_quantized_file(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == QUANT_FORMAT
    except Exception:
        return False


def read_quantized_config(path: str | Path) -> dict:
    """The config stored in an INT8 file (to check it against the one given before loading)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get("config", "{}"))
    except Exception as e:
        raise DataError(f"{path}: cannot read the quantized model: {type(e).__name__}: {e}") from None


def load_quantized(path: str | Path, model: nn.Module) -> dict:
    """Load an INT8 file written by `save_quantized` into a freshly built model of the same config
    (prepared here). Returns the file's metadata (config, info)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DataError(f"{path}: cannot read the quantized model: {type(e).__name__}: {e}") from None
    if meta.get("format") != QUANT_FORMAT:
        raise DataError(f"{path}: not a perception3d INT8 model (format {meta.get('format')!r})")
    model.eval()
    prepare(model)
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            if f"{name}.weight_int8" not in tensors:
                raise DataError(f"{path}: no int8 weight for layer {name} (a file of another model?)")
            layer = module.layer
            if layer.bias is None and f"{name}.layer.bias" in tensors:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[_out_axis(layer)]))
    state = {k: v for k, v in tensors.items() if not k.endswith(".weight_int8")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".layer.weight")]
    if missing or unexpected:
        raise DataError(f"{path}: does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            w8 = tensors[f"{name}.weight_int8"]
            shape = [1] * w8.dim()
            shape[_out_axis(module.layer)] = -1
            with torch.no_grad():
                module.layer.weight.copy_(w8.float() * module.w_scale.reshape(shape))
    return {"config": json.loads(meta.get("config", "{}")), "info": json.loads(meta.get("info", "{}"))}


# -- real INT8: the dense part on onnxruntime -------------------------------------------------------
class _DensePart(nn.Module):
    """BEV backbone + head of a quantized detector as one graph: `bev -> the head's maps` (a tuple)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bev_backbone, self.head = model.bev_backbone, model.head

    def forward(self, bev: torch.Tensor):
        o = self.head(self.bev_backbone(bev))
        return tuple(t for t in (o.heatmap, o.offset, o.z, o.dims, o.rot, o.direction, o.iou) if t is not None)


def _export_forward(self: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer as QuantizeLinear / DequantizeLinear pairs around a float convolution: what an
    ONNX exporter writes and onnxruntime's QDQ rewrite turns into INT8 kernels."""
    layer = self.layer
    w = torch.fake_quantize_per_channel_affine(layer.weight.detach(), self._export[2], self._export[3],
                                               _out_axis(layer), -128, 127)  # the weights lie in [-127, 127]
    x = torch.fake_quantize_per_tensor_affine(x, self._export[0], self._export[1], 0, 255)
    if isinstance(layer, nn.ConvTranspose2d):
        return nn.functional.conv_transpose2d(x, w, layer.bias, layer.stride, layer.padding, layer.output_padding,
                                              layer.groups, layer.dilation)
    return nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def export_dense_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write the dense part (BEV backbone and head) of a calibrated model as a QDQ ONNX graph with
    the calibrated scales (weights INT8 per channel, inputs UINT8 per tensor), batch size dynamic."""
    dense = _DensePart(model).eval()
    layers = quant_layers(dense)
    for layer in layers:
        layer._export = (float(layer.a_scale), int(layer.a_zero), layer.w_scale.detach().float().clone(),
                         torch.zeros(len(layer.w_scale), dtype=torch.int32))
        layer.forward = _export_forward.__get__(layer)
    C, H, W = model.backbone3d.bev_shape
    try:
        with torch.no_grad():
            torch.onnx.export(dense, (torch.zeros(1, C, H, W),), str(path), input_names=["bev"],
                              dynamic_axes={"bev": {0: "batch"}}, opset_version=17, dynamo=False)
    finally:
        for layer in layers:
            del layer.forward, layer._export  # back to the class's simulated forward
    return Path(path)


class OrtDense:
    """The dense part of a quantized detector on onnxruntime's INT8 kernels: called with the BEV
    map, returns the head's `CenterHeadOutput` (set as `CenterPointDetector.dense`)."""

    def __init__(self, model: nn.Module, threads: int | None = None):
        import tempfile

        import onnxruntime as ort

        from detection.models.center_head import CenterHeadOutput

        self._out = CenterHeadOutput
        self.has_iou = model.head.iou is not None
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_dense_onnx(model, Path(tmp) / "dense_int8.onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads or torch.get_num_threads()
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, bev: torch.Tensor):
        outs = [torch.from_numpy(o) for o in self.session.run(None, {"bev": bev.float().contiguous().numpy()})]
        return self._out(*outs[:6], outs[6] if self.has_iou else None)
