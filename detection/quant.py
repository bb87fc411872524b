"""INT8 post-training quantization of the detectors (LiDAR-PTQ, Zhou et al., ICLR 2024; written
from the paper).

A trained detector is prepared once (`prepare`): every BatchNorm is folded into the convolution or
linear layer before it, and every convolution / linear layer (dense `Conv2d`, `ConvTranspose2d`,
`Linear`; sparse `SubMConv3d`, `SparseConv3d`) is wrapped in a `QuantLayer` that quantizes its
weight (INT8, symmetric, one scale per output channel) and its input activation (UINT8, affine,
one scale and zero point per tensor; layers reading one tensor share it). Calibration
(`calibrate`) runs the model on a few training frames, records each layer's input values, and sets
the activation ranges by one of:

* `minmax`: the smallest and largest value seen (the baseline);
* `entropy`: TensorRT's KL-divergence threshold on the histogram of the values (the baseline);
* `sparse` (LiDAR-PTQ's sparsity-based calibration): max-min over the **non-zero** values only,
  refined layer by layer by a search over clipping ranges that minimises the layer's output error
  where the float model sees objects, so that the zeros of the scattered BEV map (empty pillars,
  most of the map) do not decide the scale;
* `lidar-ptq`: `sparse`, then LiDAR-PTQ's adaptive rounding of the dense part's weights with its
  task-guided global positive loss (TGPL: the float model's confident predictions as targets,
  `_adaround`).

`qat_finetune` is the quantization-aware fine-tune baseline; `quantize_model` runs any of them on a
dataset (`p3d quantize`). Accuracy is simulated INT8 (fake quantization: values rounded to the INT8
grid and back, what an INT8 kernel computes); the model file (`save_quantized`) stores the weights
as int8 with their scales; `OrtDense` runs the dense part (BEV backbone + head) on onnxruntime's
INT8 kernels. The pillar encoder and the sparse 3D convolutions stay simulated INT8.
"""
from __future__ import annotations

import json
import math
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from perception3d.errors import DataError
from perception3d.sparse import spconv

__all__ = ["METHODS", "PIPELINES", "QuantLayer", "prepare", "calibrate", "quant_layers", "qat_finetune",
           "default_steps", "quantize_model", "save_quantized", "load_quantized", "is_quantized_file",
           "read_quantized_config", "QUANT_FORMAT", "export_dense_onnx", "OrtDense"]

METHODS = ("lidar-ptq", "sparse", "minmax", "entropy")  # calibrations (`calibrate`)
PIPELINES = METHODS + ("qat",)  # what `quantize_model` (and `p3d quantize --method`) runs
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
        self.w_float = w.clone()  # the float (BatchNorm-folded) weight, kept for adaptive rounding
        self.round_logits: nn.Parameter | None = None  # adaptive rounding's V (`_adaround`), while it learns
        self.float_mode = False  # run as the float model: float weight, input not quantized

    def output(self, x, quantized: bool):
        """The layer's output for input `x` (a tensor, or a sparse tensor), its input quantized or not."""
        feats = x.features if self.sparse else x
        if quantized:
            feats = self.fake_quant(feats)
        out = self.layer(x.replace_feature(feats) if self.sparse else feats)
        return out.features if self.sparse else out

    def weight_int8(self) -> torch.Tensor:
        w = self.layer.weight.detach()
        return torch.clamp(torch.round(w / self.w_scale.reshape(self._shape())), -127, 127).to(torch.int8)

    def quantize_weight(self) -> None:
        """Round the layer's weight to its INT8 grid, in place (the weights a kernel would use)."""
        with torch.no_grad():
            self.layer.weight.copy_(self.weight_int8().float() * self.w_scale.reshape(self._shape()))

    def set_range(self, lo: float, hi: float) -> None:
        """UINT8 affine parameters covering `[lo, hi]` (0 always representable exactly)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        self.a_scale.fill_(scale)
        self.a_zero.fill_(int(np.clip(round(-lo / scale), 0, 255)))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x.float(), float(self.a_scale), int(self.a_zero), 0, 255).to(x.dtype)

    def _shape(self) -> list[int]:
        """The shape that broadcasts the per-output-channel `w_scale` over the weight."""
        shape = [1] * self.layer.weight.dim()
        shape[_out_axis(self.layer)] = -1
        return shape

    def soft_weight(self) -> torch.Tensor:
        """Adaptive rounding's weight: each weight on its INT8 grid rounded down, plus `h(V)` in
        [0, 1] (Nagel et al. 2020's rectified sigmoid), learnt, then set to 0 or 1 (`_adaround`'s end)."""
        s = self.w_scale.reshape(self._shape())
        return s * torch.clamp(torch.floor(self.w_float / s) + _rectified_sigmoid(self.round_logits), -127, 127)

    def forward(self, x):
        feats = x.features if self.sparse else x
        if self.capture is not None:  # calibration: hand over the input itself, stop the model here
            self.capture(x)
            raise _Captured
        if self.observe is not None:
            self.observe(self, feats)  # calibration runs without gradients
        elif self.quantize_input and not self.float_mode:
            feats = self.fake_quant(feats)
        if self.sparse or (self.round_logits is None and not self.float_mode):
            return self.layer(x.replace_feature(feats) if self.sparse else feats)
        w = self.w_float if self.float_mode else self.soft_weight()
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(feats, w, layer.bias)
        if isinstance(layer, nn.ConvTranspose2d):
            return nn.functional.conv_transpose2d(feats, w, layer.bias, layer.stride, layer.padding,
                                                  layer.output_padding, layer.groups, layer.dilation)
        return nn.functional.linear(feats, w, layer.bias)


_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


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


def _foreground_map(heatmap: torch.Tensor, threshold: float = 0.1, background: float = 0.01) -> torch.Tensor:
    """`[B, 1, H, W]`: 1 where the heatmap logits `[B, K, H, W]` are confident (any class above
    `threshold`, dilated by one cell), `background` elsewhere."""
    fg = nn.functional.max_pool2d((torch.sigmoid(heatmap.float()).amax(1, keepdim=True) > threshold).float(), 3, 1, 1)
    return fg + background * (1 - fg)


def _foreground(model: nn.Module, batches: list) -> list:
    """Per batch, the float model's `_foreground_map` at the head's resolution: the task guidance of
    the clipping search and of the rounding's reconstruction (errors where objects are count)."""
    maps: list = []
    hook = model.head.register_forward_hook(lambda m, i, out: maps.append(_foreground_map(out.heatmap)))
    try:
        for batch in batches:
            model(batch)
    finally:
        hook.remove()
    return maps


def _resized(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return (nn.functional.adaptive_max_pool2d(weight, (h, w)) if h <= weight.shape[-2]
            else nn.functional.interpolate(weight, size=(h, w), mode="nearest"))


def _weighted_error(out: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor | None) -> float:
    err = (out.float() - ref.float()).pow(2)
    if weight is None or err.dim() != 4:
        return float(err.sum())
    return float((err * _resized(weight, *err.shape[-2:])).sum())


def _refine_by_output(model: nn.Module, layers: list[QuantLayer], batches: list, facts: dict,
                      weighted: bool = True, alphas=tuple(np.linspace(1.0, 0.3, 15))) -> None:
    """LiDAR-PTQ's clipping search, layer by layer in order: each layer's input is captured from the
    model with every earlier layer already quantized, and the clipping of its non-zero max-min
    range is chosen to minimise the squared error of the layer's output against its output on the
    unquantized input (weights still float: the activation's error alone), counted where the float
    model sees objects (`_foreground`; dense BEV layers; elsewhere every value counts). Layers that
    read one tensor (`facts[name]["group"]`) are searched together, the error summed over all of
    them, and keep one range: the tensor is quantized once, as an INT8 runtime does. Then the
    weights are rounded, so later layers see what the INT8 model computes."""
    for layer in layers:
        layer.quantize_input = False
    weights = _foreground(model, batches) if weighted and hasattr(model, "head") else [None] * len(batches)
    for layer in layers:
        layer.quantize_input = True
    by_name = {layer.name: layer for layer in layers}
    done: set[str] = set()
    for layer in layers:
        if layer.name in done:
            continue
        group = [by_name[n] for n in facts[layer.name]["group"]]
        done.update(g.name for g in group)
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
            refs = [[g.output(x, quantized=False) for g in group] for x in captured]
            errors = []
            for a in alphas:
                for g in group:
                    g.set_range(a * lo0, a * hi0)
                errors.append(sum(_weighted_error(g.output(x, quantized=True), r, w)
                                  for x, rs, w in zip(captured, refs, weights) for g, r in zip(group, rs)))
            best = alphas[int(np.argmin(errors))]
            for g in group:
                g.set_range(best * lo0, best * hi0)
                facts[g.name].update(lo=best * lo0, hi=best * hi0, clip=float(best))
        for g in group:
            g.quantize_weight()


def _positives(model: nn.Module, out) -> tuple[torch.Tensor, torch.Tensor]:
    """TGPL's pseudo-targets: the float model's confident predictions, as `(frame, cell)` index
    pairs: heatmap peaks (3x3 local maxima of any class) above the head's score threshold, at most
    its `max_detections` per frame, highest first."""
    o = model.head.options
    hm = torch.sigmoid(out.heatmap.float()).amax(1)  # [B, H, W]
    peak = hm * (nn.functional.max_pool2d(hm[:, None], 3, 1, 1)[:, 0] == hm)
    B, H, W = hm.shape
    scores, cells = peak.reshape(B, -1).topk(min(o.max_detections, H * W), dim=1)
    frame = torch.arange(B)[:, None].expand_as(cells)
    keep = scores > o.score_threshold
    return frame[keep], cells[keep]


def _tgpl(q, ref, frame: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """LiDAR-PTQ's task-guided global positive loss: at the float model's positives (and the 3x3
    cells around each, so that a peak stays a peak), the squared difference of the class scores
    (sigmoid heatmaps) plus the L1 difference of every regression map (offset, height, size, axis,
    direction and IoU logits) between the quantized and the float model, per positive."""
    if frame.numel() == 0:
        return q.heatmap.sum() * 0
    B, K, H, W = q.heatmap.shape
    ys, xs = cells // W, cells % W
    d = torch.arange(-1, 2)
    yy = (ys[:, None, None] + d[None, :, None]).clamp(0, H - 1).expand(-1, 3, 3).reshape(-1)
    xx = (xs[:, None, None] + d[None, None, :]).clamp(0, W - 1).expand(-1, 3, 3).reshape(-1)
    ff = frame[:, None].expand(-1, 9).reshape(-1)
    cls = (torch.sigmoid(q.heatmap[ff, :, yy, xx]) - torch.sigmoid(ref.heatmap[ff, :, yy, xx])).pow(2).sum()

    def maps(o):
        return torch.cat([o.regression(), o.direction] + ([o.iou] if o.iou is not None else []), dim=1)

    reg = (maps(q)[frame, :, ys, xs] - maps(ref)[frame, :, ys, xs]).abs().sum()
    return (cls + reg) / frame.numel()


@torch.enable_grad()
def _adaround(model: nn.Module, bevs: list[tuple[torch.Tensor, torch.Tensor]], iters: int, tgpl_weight: float,
              lr: float = 0.1, reg_weight: float = 1.0, warmup: float = 0.2, background: float = 0.1,
              progress: Callable | None = None) -> dict:
    """LiDAR-PTQ's adaptive rounding with the TGPL, on the dense part (BEV backbone + head; its
    activation ranges already calibrated): each weight learns whether it rounds down or up
    (AdaRound's rectified sigmoid `h(V)`), all layers together, by Adam on

        reconstruction + tgpl_weight * TGPL + reg_weight * mean(1 - |2 h(V) - 1|^beta)

    where the reconstruction is the squared error of each backbone stage's output, the backbone's
    output and the head's shared features against the float model's (each relative to the float
    features' mean square), counted fully where the float model sees objects and `background`
    elsewhere (`_foreground_map`; unweighted, the rounding spends itself on the empty map and
    PointPillars loses 2.3 AP instead of gaining), the TGPL compares the head's outputs at the float
    model's positives (`_tgpl`), and the rounding regulariser, off for the first `warmup` of the
    steps, pushes each `h` to 0 or 1 as `beta` falls from 20 to 2 (lr and weight set for a budget
    of tens of steps, not AdaRound's thousands). One calibration frame per step, the float model's
    features computed once per frame. `bevs`: per calibration frame, the BEV map from the quantized
    and from the float model's first part. The weights are then rounded as learnt."""
    layers = quant_layers(model.bev_backbone) + quant_layers(model.head)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for layer in layers:
        rest = layer.w_float / layer.w_scale.reshape(layer._shape())
        rest = (rest - torch.floor(rest)).clamp(0.01, 0.99)  # h(V) starts at the float weight
        layer.round_logits = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))
    taps = list(model.bev_backbone.blocks) + [model.bev_backbone, model.head.shared]
    feats: list = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o)) for m in taps]

    def dense(bev, float_mode: bool):
        for layer in layers:
            layer.float_mode = float_mode
        feats.clear()
        out = model.head(model.bev_backbone(bev))
        return out, list(feats)

    opt = torch.optim.Adam([layer.round_logits for layer in layers], lr=lr)
    n_weights = sum(layer.w_float.numel() for layer in layers)
    start = int(warmup * iters)
    log = []

    def recon(q_feats, ref_feats, wmap):
        total = 0
        for a, b in zip(q_feats, ref_feats):
            w = _resized(wmap, *b.shape[-2:])
            total = total + ((a - b).pow(2) * w).mean() / (b.pow(2) * w).mean().clamp(min=1e-12)
        return total

    try:
        with torch.no_grad():  # the float model's features and outputs, once per frame
            refs = [dense(ref_bev, True) for _, ref_bev in bevs]
            positives = [_positives(model, out) for out, _ in refs]
            fg = [_foreground_map(out.heatmap, background=background) for out, _ in refs]
        for it in range(iters):
            k = it % len(bevs)
            ref_out, ref_feats = refs[k]
            q_out, q_feats = dense(bevs[k][0], False)
            rec, task = recon(q_feats, ref_feats, fg[k]), _tgpl(q_out, ref_out, *positives[k])
            loss = rec + tgpl_weight * task
            if it >= start:
                beta = 20 + (2 - 20) * (it - start) / max(iters - start - 1, 1)
                rnd = sum((1 - (2 * _rectified_sigmoid(layer.round_logits) - 1).abs().pow(beta)).sum()
                          for layer in layers) / n_weights
                loss = loss + reg_weight * rnd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.append((float(rec.detach()), float(task.detach())))
            if progress is not None:
                progress()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        with torch.no_grad():
            flips = 0
            for layer in layers:
                layer.float_mode = False
                if layer.round_logits is None:
                    continue
                s = layer.w_scale.reshape(layer._shape())
                q = torch.clamp(torch.floor(layer.w_float / s) + (layer.round_logits >= 0).float(), -127, 127)
                flips += int((torch.round(layer.w_float / s).clamp(-127, 127) != q).sum())
                layer.layer.weight.copy_(s * q)
                layer.round_logits = None
            hard = float(recon(dense(bevs[0][0], False)[1], refs[0][1], fg[0])) if log else None
        for h in hooks:
            h.remove()
    return {"iters": iters, "recon_first": log[0][0] if log else None, "recon_last": log[-1][0] if log else None,
            "recon_rounded_frame0": hard,
            "tgpl_first": log[0][1] if log else None, "tgpl_last": log[-1][1] if log else None,
            "weights_rounded_otherwise": flips / max(n_weights, 1)}


class _Recorder:
    """Per layer: the extremes of all input values and of the non-zero ones; with `keep_samples`, a
    random subset of the values too (what the entropy calibration's histogram is built from)."""

    def __init__(self, keep_samples: bool, seed: int = 0):
        self.stats: dict[str, dict] = {}
        self.keep_samples = keep_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.group_of: dict[str, str] = {}  # layer -> the first layer that read the same input tensor
        self._inputs: list[tuple[str, weakref.ref]] = []

    def __call__(self, layer: QuantLayer, x: torch.Tensor) -> None:
        if layer.name not in self.group_of:  # a tensor still alive at the same address is the same tensor
            self.group_of[layer.name] = next((n for n, ref in self._inputs if ref() is not None and ref().shape == x.shape
                                              and ref().data_ptr() == x.data_ptr()), layer.name)
            self._inputs.append((layer.name, weakref.ref(x)))
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


def calibrate(model: nn.Module, batches: Iterable, method: str, progress: Callable | None = None,
              search_frames: int = 4, rounding_iters: int | None = None, search: str = "task",
              tgpl_weight: float = 1.0) -> dict:
    """Set every `QuantLayer`'s activation range from the model's inputs on `batches` (a prepared
    model, `prepare`) and round the weights to INT8. Returns per-layer calibration facts (and, for
    `lidar-ptq`, the rounding's under `"_rounding"`).

    `minmax` / `entropy`: the baselines, weights rounded to nearest. `sparse`: the non-zero values'
    max-min, then the clipping search on the first `search_frames` batches (`_refine_by_output`),
    weights rounded to nearest. `lidar-ptq`: `sparse`, then the dense part's weights rounded by
    adaptive rounding with the TGPL (`_adaround`, `rounding_iters` Adam steps over all batches;
    default `default_steps`).
    For the ablation: `search` = `task` (errors weighted to objects), `plain` (every value counts)
    or `none` (no search: the non-zero max-min); `tgpl_weight` 0 leaves the reconstruction alone."""
    batches = list(batches)
    if method not in METHODS:
        raise DataError(f"quantization method {method!r}: expected one of {', '.join(METHODS)}")
    if search not in ("task", "plain", "none"):
        raise ValueError(f"calibrate: search {search!r}: expected task, plain or none")
    layers = quant_layers(model)
    if not layers:
        raise ValueError("calibrate: the model has no QuantLayer (call prepare first)")
    rounding_iters = default_steps(method) if rounding_iters is None else rounding_iters
    learn = method == "lidar-ptq" and rounding_iters > 0
    if learn and not hasattr(model, "head"):
        raise ValueError("calibrate: lidar-ptq needs a detector (a model with a BEV backbone and a head)")
    rec = _Recorder(keep_samples=method == "entropy")
    ref_bevs: list = []
    hook = model.backbone3d.register_forward_hook(lambda m, i, o: ref_bevs.append(o[0])) if learn else None
    for layer in layers:
        layer.observe = rec
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
                if progress is not None:
                    progress()
    finally:
        for layer in layers:
            layer.observe = None
        if hook is not None:
            hook.remove()
    facts = {}
    for layer in layers:
        st = rec.stats.get(layer.name)
        if st is None:
            raise DataError(f"calibration: layer {layer.name} saw no input (no calibration frames reached it)")
        group = [g.name for g in layers if rec.group_of[g.name] == rec.group_of[layer.name]]
        leader = group[0]
        if leader != layer.name:  # one tensor, one range (its statistics are the leader's)
            lo, hi = facts[leader]["lo"], facts[leader]["hi"]
        elif method == "minmax":
            lo, hi = st["min"], st["max"]
        elif method == "entropy":
            t = _entropy_threshold(rec.sample(layer.name).numpy())
            lo, hi = max(st["min"], -t), min(st["max"], t)
        else:  # sparse, lidar-ptq: the non-zero values' max-min, refined below
            lo, hi = (min(st["nz_min"], 0.0), max(st["nz_max"], 0.0)) if st["n_nz"] else (0.0, 0.0)
        layer.set_range(lo, hi)
        facts[layer.name] = {"lo": lo, "hi": hi, "zero_fraction": 1 - st["n_nz"] / max(st["n"], 1),
                             "seen_min": st["min"], "seen_max": st["max"], "group": group}
    if method in ("sparse", "lidar-ptq") and search != "none":
        with torch.no_grad():
            _refine_by_output(model, layers, batches[:search_frames], facts, weighted=search == "task")
    else:
        for layer in layers:
            layer.quantize_weight()
    if learn:
        with torch.no_grad():
            bevs = [(model.backbone3d(model.voxelize(b))[0].contiguous(memory_format=torch.channels_last),
                     r.contiguous(memory_format=torch.channels_last)) for b, r in zip(batches, ref_bevs)]
        facts["_rounding"] = _adaround(model, bevs, rounding_iters, tgpl_weight, progress=progress)
    return facts


# -- the QAT baseline ------------------------------------------------------------------------------
class _FakeQuantWeight(nn.Module):
    """A weight parametrization: the weight on its INT8 grid in the forward pass, its gradient
    passed straight through to the float weight (inside the grid's range)."""

    def __init__(self, scale: torch.Tensor, axis: int):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero", torch.zeros(len(scale), dtype=torch.int32))
        self.axis = axis

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero, self.axis, -127, 127)


def qat_finetune(model: nn.Module, batches: Iterable, lr: float = 1e-4, progress: Callable | None = None) -> dict:
    """Quantization-aware fine-tune of a calibrated model (the baseline LiDAR-PTQ is measured
    against): the float weights come back, and every training step runs the INT8 model (weights on
    their grid, inputs fake-quantized at their calibrated ranges, gradients passed straight through
    the rounding) on one batch of `batches` and updates all float weights by AdamW on the detector's
    own training loss. At the end the weights are rounded to INT8. Returns the losses."""
    from torch.nn.utils import parametrize

    layers = quant_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.layer.weight.copy_(layer.w_float)
            parametrize.register_parametrization(layer.layer, "weight", _FakeQuantWeight(layer.w_scale, _out_axis(layer.layer)))
    params = [p for p in model.parameters() if p.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    try:
        with torch.enable_grad():
            for batch in batches:
                loss = model(batch)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress()
    finally:
        model.eval()
        with torch.no_grad():
            for layer in layers:
                parametrize.remove_parametrizations(layer.layer, "weight", leave_parametrized=True)
                layer.w_float = layer.layer.weight.detach().clone()
    return {"steps": len(losses), "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


# -- the pipeline ----------------------------------------------------------------------------------
def default_steps(method: str) -> int:
    """Optimisation steps of `quantize_model`: adaptive rounding (lidar-ptq), fine-tune (qat)."""
    return {"lidar-ptq": 64, "qat": 100}.get(method, 0)


def quantize_model(model: nn.Module, train_set, method: str, calib_frames: int = 16, steps: int | None = None,
                   batch_size: int = 4, seed: int = 0, progress: Callable | None = None) -> dict:
    """Quantize a trained detector (eval mode) in place by `method` (`PIPELINES`), calibrating on
    `calib_frames` frames of `train_set` evenly spaced through it (`qat`: the `sparse` calibration,
    then `steps` fine-tune steps on shuffled batches of `batch_size` frames). `progress` is called
    once per calibration frame and per step. Returns what the INT8 file records (`info`) and the
    per-layer facts."""
    from detection.structures import collate

    if method not in PIPELINES:
        raise DataError(f"quantization method {method!r}: expected one of {', '.join(PIPELINES)}")
    steps = default_steps(method) if steps is None else steps
    picks = np.unique(np.linspace(0, len(train_set) - 1, min(calib_frames, len(train_set))).round().astype(int))
    t0 = time.perf_counter()
    prepare(model)
    facts = calibrate(model, (collate([train_set[int(i)]]) for i in picks), "sparse" if method == "qat" else method,
                      progress=progress, rounding_iters=steps)
    info = {"method": method, "calib_frames": len(picks), "layers": len(quant_layers(model))}
    if "_rounding" in facts:
        info["rounding"] = facts.pop("_rounding")
    if method == "qat":
        gen = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(len(train_set), generator=gen)
                           for _ in range(steps * batch_size // max(len(train_set), 1) + 1)])
        batches = (collate([train_set[int(i)] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(steps))
        info["qat"] = qat_finetune(model, batches, progress=progress)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return {"info": info, "facts": facts}


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
            with torch.no_grad():
                module.layer.weight.copy_(tensors[f"{name}.weight_int8"].float() * module.w_scale.reshape(module._shape()))
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
    ONNX exporter writes and onnxruntime's QDQ rewrite turns into INT8 kernels (`export_dense_onnx`
    sets `_export`: input scale and zero point, weight scales, and the requantization of the output
    or None)."""
    layer, (a_scale, a_zero, w_scale, out_q, seen) = self.layer, self._export
    if id(x) in seen and seen[id(x)][0] == (a_scale, a_zero):  # quantize a tensor read by several layers once
        xq = seen[id(x)][2]
    else:
        xq = torch.fake_quantize_per_tensor_affine(x, a_scale, a_zero, 0, 255)
        seen[id(x)] = ((a_scale, a_zero), x, xq)
    w, bias = layer.weight.detach(), layer.bias
    k = layer.kernel_size[0] if isinstance(layer, nn.ConvTranspose2d) else 1
    if isinstance(layer, nn.ConvTranspose2d):  # kernel == stride: a 1x1 conv to (C_out, k, k) channels, then depth-to-space
        w = w.permute(1, 2, 3, 0).reshape(-1, w.shape[0], 1, 1)
        w_scale = w_scale.repeat_interleave(k * k)
        bias = bias.repeat_interleave(k * k) if bias is not None else None
    w = torch.fake_quantize_per_channel_affine(w, w_scale, torch.zeros(len(w_scale), dtype=torch.int32), 0,
                                               -128, 127)  # the weights lie in [-127, 127]
    if isinstance(layer, nn.ConvTranspose2d):
        out = nn.functional.conv2d(xq, w, bias)
    else:
        out = nn.functional.conv2d(xq, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if out_q is not None:  # requantized at once for its consumer: onnxruntime then runs an INT8 kernel
        out = torch.fake_quantize_per_tensor_affine(out, out_q[0], out_q[1], 0, 255)
    return nn.functional.pixel_shuffle(out, k) if k > 1 else out


def _deconv_as_conv(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.ConvTranspose2d) and layer.kernel_size[0] == layer.kernel_size[1] == layer.stride[0]
            == layer.stride[1] and layer.padding == (0, 0) and layer.output_padding == (0, 0) and layer.groups == 1
            and layer.dilation == (1, 1))


def export_dense_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write the dense part (BEV backbone and head) of a calibrated model as a QDQ ONNX graph with
    the calibrated scales (weights INT8 per channel, inputs UINT8 per tensor), batch size dynamic.

    Written so that onnxruntime turns every convolution but the head's output layers into an INT8
    kernel (`QLinearConv`, which needs a quantized input and a quantization right after it):
    a tensor read by several layers is quantized once (calibration gives them one range); each
    deblock's output is quantized at the head's input scale (the deblocks' ReLU and concatenation
    commute with a zero-point-0 quantization, so the values are those of the simulation); a
    transposed convolution with kernel == stride is written as the 1x1 convolution and
    depth-to-space it is. The head's output layers stay float (their maps leave the graph in
    float), on quantized inputs."""
    dense = _DensePart(model).eval()
    layers = quant_layers(dense)
    seen: dict = {}
    head_in = dense.head.shared[0]
    for layer in layers:
        if isinstance(layer.layer, nn.ConvTranspose2d) and not _deconv_as_conv(layer.layer):
            raise ValueError(f"export_dense_onnx: {layer.name}: transposed convolutions need kernel == stride, "
                             f"no padding, no groups (got {layer.layer})")
        layer._export = (float(layer.a_scale), int(layer.a_zero), layer.w_scale.detach().float().clone(), None, seen)
    if isinstance(head_in, QuantLayer) and int(head_in.a_zero) == 0:
        for deblock in dense.bev_backbone.deblocks:
            if isinstance(deblock[0], QuantLayer):
                deblock[0]._export = deblock[0]._export[:3] + ((float(head_in.a_scale), 0), seen)
    for layer in layers:
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
            # no spin-waiting between calls: torch runs the rest of the frame on the same cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, bev: torch.Tensor):
        outs = [torch.from_numpy(o) for o in self.session.run(None, {"bev": bev.float().contiguous().numpy()})]
        return self._out(*outs[:6], outs[6] if self.has_iou else None)
