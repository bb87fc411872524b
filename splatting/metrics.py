"""Image-quality metrics for novel-view synthesis: PSNR, SSIM (+ the D-SSIM loss) and LPIPS.

Layout (the splatting trainer's): images are **channel-last float** tensors in `[0, 1]`, either one
image `[H, W, 3]` or a batch `[B, H, W, 3]`; `img` and `ref` have the same shape. Every metric is
computed per image and then, with `reduction="mean"` (default), averaged over the batch, which is
how 3DGS papers report a test set; `reduction="none"` returns `[B]` (or a 0-d tensor for one image).

- :func:`psnr`: `10 log10(max_val^2 / MSE)`, the MSE over all pixels and channels of one image.
- :func:`ssim`: `kornia.metrics.ssim` (11 x 11 Gaussian window, sigma 1.5, `c1 = (0.01 L)^2`,
  `c2 = (0.03 L)^2`), averaged over channels and pixels. `padding="valid"` (default) averages only
  the windows that fit inside the image, which is what scikit-image's `structural_similarity`
  (`gaussian_weights=True, sigma=1.5, use_sample_covariance=False`), torchmetrics and gsplat's
  trainer report; `padding="same"` reflect-pads the border (kornia's default).
- :func:`ssim_loss`: `1 - ssim`, differentiable, for the 3DGS training loss
  `(1 - lambda) L1 + lambda D-SSIM`.
- :class:`LPIPS`: the learned perceptual metric (Zhang et al. 2018, AlexNet, v0.1) in plain torch.
  Weights cannot be downloaded at run time: load them from a local file (:meth:`LPIPS.from_file`,
  :func:`default_lpips`) or assemble them from torchvision's AlexNet and the lpips package's
  `alex.pth` (:meth:`LPIPS.from_official`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from perception3d.errors import DataError
from perception3d.io.atomic import atomic_path

__all__ = ["psnr", "ssim", "ssim_loss", "LPIPS", "default_lpips", "LPIPS_ENV", "LPIPS_DEFAULT_PATH"]

logger = logging.getLogger(__name__)

#: environment variable naming the combined LPIPS weight file
LPIPS_ENV = "P3D_LPIPS_WEIGHTS"
#: where :func:`default_lpips` looks when the environment variable is unset
LPIPS_DEFAULT_PATH = "~/.cache/perception3d/lpips_alex.pth"


def _check_pair(img: torch.Tensor, ref: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate a channel-last image pair; returns batched `[B, H, W, 3]` views and whether input was batched."""
    for arg, t in (("img", img), ("ref", ref)):
        if not isinstance(t, torch.Tensor):
            raise DataError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim not in (3, 4) or t.shape[-1] != 3:
            raise DataError(f"{name}: {arg} must be channel-last [H, W, 3] or [B, H, W, 3], got {list(t.shape)}"
                            + (" (channel-first [B, 3, H, W]? permute(0, 2, 3, 1) it)"
                               if t.ndim == 4 and t.shape[1] == 3 else ""))
        if not t.is_floating_point():
            raise DataError(f"{name}: {arg} must be a float image in [0, 1], got dtype {t.dtype}")
    if img.shape != ref.shape:
        raise DataError(f"{name}: img and ref shapes differ: {list(img.shape)} vs {list(ref.shape)}")
    batched = img.ndim == 4
    if not batched:
        img, ref = img[None], ref[None]
    return img, ref, batched


def _compute_dtype(img: torch.Tensor, ref: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (half inputs are computed in float32)."""
    return torch.promote_types(torch.promote_types(img.dtype, ref.dtype), torch.float32)


def _reduce(per_image: torch.Tensor, batched: bool, reduction: str, name: str) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "none":
        return per_image if batched else per_image[0]
    raise DataError(f"{name}: reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(img: torch.Tensor, ref: torch.Tensor, max_val: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB.

    Args:
        img: `[H, W, 3]` or `[B, H, W, 3]` float image, values in `[0, max_val]`.
        ref: reference image, same shape.
        max_val: the peak value (1.0 for images in [0, 1]).
        reduction: "mean" (average of the per-image PSNRs) or "none" (`[B]`, or 0-d for one image).

    Returns:
        float32 (float64 for float64 inputs) tensor in dB; `inf` for identical images. Differentiable.

    Raises:
        DataError: shapes not channel-last RGB or not equal, non-float images, bad `reduction`.
    """
    img, ref, batched = _check_pair(img, ref, "psnr")
    dt = _compute_dtype(img, ref)
    mse = (img.to(dt) - ref.to(dt)).pow(2).mean(dim=(1, 2, 3))
    per_image = 10.0 * torch.log10(float(max_val) ** 2 / mse)
    return _reduce(per_image, batched, reduction, "psnr")


def ssim(img: torch.Tensor, ref: torch.Tensor, max_val: float = 1.0, window_size: int = 11,
         padding: str = "valid", reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Gaussian window, sigma 1.5), via `kornia.metrics.ssim`.

    Args:
        img: `[H, W, 3]` or `[B, H, W, 3]` float image in `[0, max_val]`.
        ref: reference image, same shape.
        max_val: the data range `L` (`c1 = (0.01 L)^2`, `c2 = (0.03 L)^2`).
        window_size: odd Gaussian window size (11 is the standard).
        padding: "valid" averages only windows fully inside the image (matches scikit-image,
            torchmetrics and gsplat's evaluation; needs `H, W >= window_size`); "same" reflect-pads
            the border.
        reduction: "mean" over the batch, or "none" (`[B]`, or 0-d for one image).

    Returns:
        float32 (float64 for float64 inputs) tensor, 1 for identical images. Differentiable.

    Raises:
        DataError: bad shapes (see :func:`psnr`), an image smaller than the window, bad `padding`.
    """
    img, ref, batched = _check_pair(img, ref, "ssim")
    if padding not in ("valid", "same"):
        raise DataError(f"ssim: padding must be 'valid' or 'same', got {padding!r}")
    if window_size % 2 != 1 or window_size < 3:
        raise DataError(f"ssim: window_size must be odd and >= 3, got {window_size}")
    need = window_size if padding == "valid" else window_size // 2 + 1
    if min(img.shape[1], img.shape[2]) < need:
        raise DataError(f"ssim: image {img.shape[1]} x {img.shape[2]} is smaller than {need} px "
                        f"(window {window_size}, padding {padding!r})")
    try:
        import kornia.metrics  # only SSIM needs kornia
    except ImportError as exc:
        raise ImportError(f"ssim needs kornia (pip install kornia): {exc}") from exc
    dt = _compute_dtype(img, ref)
    x = img.to(dt).permute(0, 3, 1, 2).contiguous()
    y = ref.to(dt).permute(0, 3, 1, 2).contiguous()
    # eps=0: c1 * c2 > 0 already keeps the denominator positive, and this matches the references.
    smap = kornia.metrics.ssim(x, y, window_size, max_val=float(max_val), eps=0.0, padding=padding)
    return _reduce(smap.mean(dim=(1, 2, 3)), batched, reduction, "ssim")


def ssim_loss(img: torch.Tensor, ref: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """D-SSIM training loss `1 - SSIM(img, ref)` (batch mean, "valid" windows), differentiable.

    The same quantity as `1 - ssim(img, ref, padding="valid")` (tested against it) computed for
    the training loop's sake with the Gaussian window applied as two 1-D passes over the five
    stacked moment images in one depthwise convolution each: forward + backward on a 270 x 480
    image measured 35 ms against 45 ms for kornia's 2-D window.

    Args: `img`, `ref` as :func:`ssim` (images in [0, 1]).

    Returns:
        0-d tensor in `[0, 2]`; 0 for identical images.
    """
    img, ref, _ = _check_pair(img, ref, "ssim_loss")
    if min(img.shape[1], img.shape[2]) < window_size:
        raise DataError(f"ssim_loss: image {img.shape[1]} x {img.shape[2]} is smaller than the {window_size} px window")
    dt = _compute_dtype(img, ref)
    x = img.to(dt).permute(0, 3, 1, 2).contiguous()
    y = ref.to(dt).permute(0, 3, 1, 2).contiguous()
    Ch = x.shape[1]
    r = torch.arange(window_size, dtype=dt, device=x.device) - window_size // 2
    g = torch.exp(-(r**2) / (2 * 1.5**2))
    g = g / g.sum()
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [B, 5 Ch, H, W]
    n = stack.shape[1]
    blur = F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, window_size), groups=n)
    blur = F.conv2d(blur, g.view(1, 1, -1, 1).expand(n, 1, window_size, 1), groups=n)
    mx, my, sxx, syy, sxy = blur.split(Ch, dim=1)
    c1, c2 = 0.01**2, 0.03**2
    mxy, mm = mx * my, mx * mx + my * my
    smap = ((2 * mxy + c1) * (2 * (sxy - mxy) + c2)) / ((mm + c1) * (sxx + syy - mm + c2))
    return 1.0 - smap.mean()


# ------------------------------------------------------------------------------------------------
# LPIPS
# ------------------------------------------------------------------------------------------------
# AlexNet `features` (torchvision layout, indices kept so keys match `features.N.weight`)
_ALEX_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1), 8: (384, 256, 3, 1, 1),
               10: (256, 256, 3, 1, 1)}
_TAP_CHANNELS = (64, 192, 384, 256, 256)
_TAP_AFTER = (1, 4, 7, 9, 11)  # indices of the 5 ReLUs in `features`
_MIN_SIDE = 31  # smallest H, W the AlexNet trunk accepts (two 3/2 max-pools after a stride-4 conv)


def _load_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{path}: cannot read {what} as a torch state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"{path}: {what} must be a dict of tensors (a state dict), got {type(sd).__name__}")
    return sd


class LPIPS(nn.Module):
    """LPIPS distance, AlexNet variant v0.1 (Zhang et al., CVPR 2018), in plain torch.

    `forward(img, ref)` takes channel-last images in `[0, 1]` (`[H, W, 3]` or `[B, H, W, 3]`, `H, W >= 31`):

    1. rescale to `[-1, 1]`, then the LPIPS scaling layer `(x - shift) / scale` with
       `shift = (-0.030, -0.088, -0.188)`, `scale = (0.458, 0.448, 0.450)`;
    2. AlexNet `features` (torchvision's layer shapes), tapped after its 5 ReLUs (64, 192, 384, 256,
       256 channels);
    3. each tap divided by its per-pixel channel norm (`x / (||x||_2 + 1e-10)`);
    4. squared difference of the two images' normalised taps, a 1 x 1 conv to 1 channel without bias
       (the learned "lin" layers), averaged over pixels, summed over the 5 taps.

    State-dict keys: `features.{0,3,6,8,10}.{weight,bias}` (as torchvision's AlexNet) and
    `lins.{0..4}.weight` (`[1, C, 1, 1]`). A freshly constructed module has random weights, useful
    only for tests; use :meth:`from_file`, :meth:`from_official` or :func:`default_lpips`. The
    parameters are frozen (`requires_grad=False`) and the module is in eval mode; gradients still
    flow to the images, so it can serve as a perceptual loss.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(12):
            if i in _ALEX_CONVS:
                cin, cout, k, s, p = _ALEX_CONVS[i]
                layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
            elif i in (2, 5):
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        with torch.no_grad():  # the trained lin weights are >= 0 (a distance); keep that for random init
            for lin in self.lins:
                lin.weight.abs_()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """Load weights from ONE local torch state-dict file with this module's key names.

        Raises:
            DataError: missing or unreadable file, missing or unexpected keys (listed), or a tensor
                of the wrong shape (key, expected and actual shape), all naming the file.
        """
        sd = _load_state_dict(path, "LPIPS weight file")
        model = cls()
        model._load_checked(sd, Path(path).expanduser(), strict_extra=True)
        return model

    @classmethod
    def from_official(cls, alexnet_pth: str | Path, lpips_alex_pth: str | Path) -> "LPIPS":
        """Assemble the metric from the two official weight files, if you have them locally.

        Args:
            alexnet_pth: torchvision's ImageNet AlexNet state dict (`alexnet-owt-7be5be79.pth`; keys
                `features.0.weight`, ...; the `classifier.*` keys are ignored).
            lpips_alex_pth: the lpips package's `weights/v0.1/alex.pth` (keys `lin0.model.1.weight`
                ... `lin4.model.1.weight`).

        Save the result with :meth:`save` to :data:`LPIPS_DEFAULT_PATH` for :func:`default_lpips`.

        Raises:
            DataError: as :meth:`from_file`, naming the offending file and its missing keys.
        """
        alex = _load_state_dict(alexnet_pth, "torchvision AlexNet weight file")
        lins = _load_state_dict(lpips_alex_pth, "lpips v0.1 alex.pth weight file")
        model = cls()
        feat_keys = [k for k in model.state_dict() if k.startswith("features.")]
        model._load_checked({k: alex[k] for k in feat_keys if k in alex}, Path(alexnet_pth).expanduser(),
                            strict_extra=False, only=feat_keys)
        lin_sd = {f"lins.{i}.weight": lins[f"lin{i}.model.1.weight"] for i in range(5)
                  if f"lin{i}.model.1.weight" in lins}
        missing = [f"lin{i}.model.1.weight" for i in range(5) if f"lin{i}.model.1.weight" not in lins]
        if missing:
            raise DataError(f"{Path(lpips_alex_pth).expanduser()}: lpips alex.pth is missing key(s) "
                            f"{', '.join(missing)} (found {', '.join(sorted(lins)) or 'none'})")
        model._load_checked(lin_sd, Path(lpips_alex_pth).expanduser(), strict_extra=False,
                            only=[f"lins.{i}.weight" for i in range(5)])
        return model

    def _load_checked(self, sd: dict[str, torch.Tensor], path: Path, strict_extra: bool,
                      only: list[str] | None = None) -> None:
        own = self.state_dict()
        keys = only if only is not None else list(own)
        missing = [k for k in keys if k not in sd]
        extra = sorted(k for k in sd if k not in own) if strict_extra else []
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing key(s) {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected key(s) {', '.join(extra[:10])}"
                             + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
            raise DataError(f"{path}: not an LPIPS weight file with this module's keys: {'; '.join(parts)}")
        for k in keys:
            if tuple(sd[k].shape) != tuple(own[k].shape):
                raise DataError(f"{path}: LPIPS weight {k!r} has shape {list(sd[k].shape)}, "
                                f"expected {list(own[k].shape)}")
            if not sd[k].is_floating_point() or not torch.isfinite(sd[k]).all():
                raise DataError(f"{path}: LPIPS weight {k!r} is not a finite float tensor")
        with torch.no_grad():
            for k in keys:
                own[k].copy_(sd[k].to(own[k].dtype))

    def save(self, path: str | Path) -> None:
        """Write the weights as one state-dict file (readable by :meth:`from_file`), atomically."""
        path = Path(path).expanduser()
        with atomic_path(path) as tmp:
            torch.save({k: v.detach().cpu().clone() for k, v in self.state_dict().items()}, tmp)

    # -- forward ----------------------------------------------------------------------------------
    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """AlexNet activations after the 5 ReLUs for a scaled `[B, 3, H, W]` input (step 2)."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAP_AFTER:
                out.append(x)
        return out

    def forward(self, img: torch.Tensor, ref: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """LPIPS distance between channel-last images in `[0, 1]`.

        Args:
            img: `[H, W, 3]` or `[B, H, W, 3]`, `H, W >= 31`.
            ref: same shape.
            reduction: "mean" over the batch, or "none" (`[B]`, or 0-d for one image).

        Returns:
            float tensor, >= 0, 0 for identical images (lower is more similar).

        Raises:
            DataError: bad shapes (see :func:`psnr`) or images smaller than 31 x 31.
        """
        img, ref, batched = _check_pair(img, ref, "LPIPS")
        if min(img.shape[1], img.shape[2]) < _MIN_SIDE:
            raise DataError(f"LPIPS: image {img.shape[1]} x {img.shape[2]} is too small; the AlexNet trunk "
                            f"needs at least {_MIN_SIDE} x {_MIN_SIDE}")
        dtype = self.shift.dtype
        both = torch.cat([img, ref], 0).to(dtype).permute(0, 3, 1, 2)
        both = (both * 2.0 - 1.0 - self.shift) / self.scale
        b = img.shape[0]
        total = torch.zeros(b, dtype=dtype, device=both.device)
        for lin, feat in zip(self.lins, self.taps(both)):
            feat = feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            diff = (feat[:b] - feat[b:]).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return _reduce(total, batched, reduction, "LPIPS")


def default_lpips(device: torch.device | str | None = None) -> LPIPS | None:
    """The LPIPS metric from the local weight file, or None when there is none.

    Looks at `$P3D_LPIPS_WEIGHTS` if set, else `~/.cache/perception3d/lpips_alex.pth` (a file
    written by :meth:`LPIPS.save`). When the file is absent, logs one warning line saying where it
    looked and how to create it, and returns None (callers skip LPIPS).

    Raises:
        DataError: the file exists but is not a valid LPIPS weight file (see :meth:`LPIPS.from_file`).
    """
    env = os.environ.get(LPIPS_ENV)
    path = Path(env if env else LPIPS_DEFAULT_PATH).expanduser()
    if not path.is_file():
        source = f"${LPIPS_ENV}" if env else "the default path"
        logger.warning("LPIPS weights not found at %s (%s); LPIPS is skipped. Create the file with "
                       "LPIPS.from_official(alexnet-owt-7be5be79.pth, lpips v0.1 alex.pth).save(path) "
                       "or set $%s.", path, source, LPIPS_ENV)
        return None
    model = LPIPS.from_file(path)
    return model.to(device) if device is not None else model
