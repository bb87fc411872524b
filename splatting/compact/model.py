"""Compact 3DGS models: the trainable one and the frozen one that is saved, loaded and rendered.

Written from the paper's description (Lee et al., "Compact 3D Gaussian Representation for Radiance
Field", CVPR 2024).

Per Gaussian the trainer keeps ``means``, ``scales`` (log), ``quats``, ``opacities`` (logit) and
``mask`` (logit) in its ParameterDict, so gsplat's densification clones, splits and prunes all of
them together; :class:`CompactModel` holds what is shared: the colour field and the two residual
vector quantizers. A render (:meth:`CompactModel.render`):

1. mask ``M = binary_mask(mask)`` multiplies the scales and the opacities;
2. in the final phase (:attr:`CompactModel.vq_active`) log-scales and unit quaternions pass
   through their R-VQ (straight-through); before it they are used as they are;
3. colour = ``ColorField(hash(contract((means - centre) / radius)), means - camera centre)``;
4. :func:`splatting.rasterize.rasterize` with these colours.

:class:`CompactGaussians` is the frozen result: masked Gaussians removed, scales and rotations as
codebook indices, and the field. :meth:`CompactGaussians.save` writes one file, either plain
(float32 positions and opacities, uint8 indices, float32 tables: "without post-processing") or
post-processed (Morton order; float16 positions; 8-bit opacities and hash table; Huffman-coded
indices; float16 codebooks and MLP; the position and opacity bytes then go through LZMA, which the
Morton order makes effective). :meth:`CompactGaussians.load` renders straight from either.
"""
from __future__ import annotations

import lzma
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from perception3d.errors import ConfigError, DataError
from splatting.compact.codec import huffman_decode, huffman_encode, morton_order, read_container, write_container
from splatting.compact.hashgrid import ColorField, HashGrid
from splatting.compact.quantize import ResidualVQ, binary_mask, dequantize_uint8, quantize_uint8
from splatting.rasterize import rasterize

__all__ = ["CompactOptions", "CompactModel", "CompactGaussians"]


@dataclass(frozen=True)
class CompactOptions:
    """Compact 3DGS options (the ``compact`` section of a splatting config).

    Attributes:
        mask_lambda: weight of the mask sparsity loss ``mean(sigmoid(mask))``.
        mask_threshold: a Gaussian is masked when ``sigmoid(mask) <= mask_threshold``.
        mask_init: initial mask logit.
        mask_lr: Adam learning rate of the mask logits.
        mask_start_fraction: the sparsity loss is on from this fraction of the steps (0: from the
            start, as in the paper; before it, the masks only follow the rendering loss).
        prune_every: masked Gaussians are removed at every densification step and, after
            densification stops, every this many steps.
        hash_levels, hash_features, hash_log2_size, hash_min_resolution, hash_max_resolution:
            :class:`~splatting.compact.hashgrid.HashGrid` options.
        mlp_hidden: hidden width of the colour MLP.
        field_lr: Adam learning rate of the hash table and the MLP (0.003: measured best of
            0.001-0.03, see splatting/design.md).
        vq_stages, vq_codebook_size: R-VQ stages and codebook entries (6 x 64 in the paper).
        vq_start_fraction: R-VQ is on for the last ``1 - vq_start_fraction`` of the steps
            (codebooks initialised by k-means when it starts).
        vq_lr: Adam learning rate of the codebooks.
        vq_lambda: weight of the R-VQ loss.
    """

    mask_lambda: float = 5e-4
    mask_threshold: float = 0.01
    mask_init: float = 2.0
    mask_lr: float = 0.01
    mask_start_fraction: float = 0.0
    prune_every: int = 500
    hash_levels: int = 8
    hash_features: int = 2
    hash_log2_size: int = 12
    hash_min_resolution: int = 16
    hash_max_resolution: int = 512
    mlp_hidden: int = 64
    field_lr: float = 0.003
    vq_stages: int = 6
    vq_codebook_size: int = 64
    vq_start_fraction: float = 0.8
    vq_lr: float = 1e-3
    vq_lambda: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"compact.{name}={getattr(self, name)!r}: expected {expected}")

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (number(self.mask_start_fraction) and 0.0 <= self.mask_start_fraction <= 1.0):
            raise bad("mask_start_fraction", "a fraction of the steps in [0, 1]")
        if not (number(self.vq_start_fraction) and 0.0 <= self.vq_start_fraction < 1.0):
            raise bad("vq_start_fraction", "a fraction of the steps in [0, 1) (the saved .cgs needs the R-VQ "
                                           "phase to have started before the last step)")
        for name in ("mask_lambda", "mask_lr", "field_lr", "vq_lr", "vq_lambda"):
            if not (number(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, "a finite number >= 0")
        if not number(self.mask_init):
            raise bad("mask_init", "a finite logit")
        if not (number(self.mask_threshold) and 0.0 < self.mask_threshold < 1.0):
            raise bad("mask_threshold", "a probability strictly between 0 and 1")
        for name in ("prune_every", "hash_levels", "hash_features", "hash_min_resolution", "mlp_hidden", "vq_stages"):
            if not (whole(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "a whole number >= 1")
        if not (whole(self.hash_log2_size) and 4 <= self.hash_log2_size <= 24):
            raise bad("hash_log2_size", "a whole number in [4, 24] (a hash table of 2^4 to 2^24 entries per level)")
        if not (whole(self.hash_max_resolution) and self.hash_max_resolution >= self.hash_min_resolution):
            raise bad("hash_max_resolution",
                      f"a whole number >= compact.hash_min_resolution = {self.hash_min_resolution}")
        if not (whole(self.vq_codebook_size) and 1 <= self.vq_codebook_size <= 65536):
            raise bad("vq_codebook_size", "a whole number in [1, 65536] (indices are stored as uint8 / uint16)")


def _field(o: CompactOptions) -> ColorField:
    grid = HashGrid(o.hash_levels, o.hash_features, o.hash_log2_size, o.hash_min_resolution, o.hash_max_resolution)
    return ColorField(grid, o.mlp_hidden)


def _index_dtype(opts: CompactOptions):
    return np.uint8 if opts.vq_codebook_size <= 256 else np.uint16


def _camera_centres(viewmats: torch.Tensor) -> torch.Tensor:
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3:]
    return (-R.transpose(1, 2) @ t)[..., 0]  # [C, 3]


class CompactModel(nn.Module):
    """The shared parts of a Compact 3DGS model under training (see the module docstring).

    Args:
        opts: :class:`CompactOptions`.
        centre, radius: the scene's centre and radius; ``(means - centre) / radius`` is contracted
            before the hash grid.
    """

    def __init__(self, opts: CompactOptions, centre: torch.Tensor, radius: float) -> None:
        super().__init__()
        self.opts = opts
        self.field = _field(opts)
        self.vq_scale = ResidualVQ(3, opts.vq_stages, opts.vq_codebook_size)
        self.vq_rot = ResidualVQ(4, opts.vq_stages, opts.vq_codebook_size)
        self.register_buffer("centre", centre.detach().float().reshape(3).clone())
        self.register_buffer("radius", torch.tensor(float(radius)))
        self.register_buffer("vq_on", torch.tensor(False))

    @property
    def vq_active(self) -> bool:
        return bool(self.vq_on)

    @torch.no_grad()
    def start_vq(self, params) -> None:
        """Initialise both codebooks by k-means of the current Gaussians and switch R-VQ on."""
        self.vq_scale.init_kmeans(params["scales"].detach())
        self.vq_rot.init_kmeans(F.normalize(params["quats"].detach(), dim=-1))
        self.vq_on.fill_(True)

    def masked(self, params) -> torch.Tensor:
        """[N] bool, True for the Gaussians the mask switches off."""
        return torch.sigmoid(params["mask"].detach()) <= self.opts.mask_threshold

    def render(self, params, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, **kwargs):
        """Render with mask, R-VQ (when active) and the colour field.

        Returns:
            ``(rgb, alpha, depth, meta, losses)`` with ``losses = {"mask": ..., "vq": ...}``
            (unweighted).
        """
        means = params["means"]
        mask = binary_mask(params["mask"], self.opts.mask_threshold)
        log_scales, quats = params["scales"], F.normalize(params["quats"], dim=-1)
        vq = means.new_zeros(())
        if self.vq_active:
            log_scales, l_s = self.vq_scale(log_scales)
            quats, l_r = self.vq_rot(quats)
            vq = l_s + l_r
        feats = self.field.encode((means - self.centre) / self.radius)
        colors = self.field(feats, means - _camera_centres(viewmats)[0])
        out = rasterize(means, quats, torch.exp(log_scales) * mask[:, None], torch.sigmoid(params["opacities"]) * mask,
                        colors, viewmats, Ks, width, height, **kwargs)
        return (*out, {"mask": torch.sigmoid(params["mask"]).mean(), "vq": vq})


class CompactGaussians:
    """Frozen Compact 3DGS: what is saved, loaded and rendered (masked Gaussians removed).

    Attributes:
        means [N, 3]; opacities [N] in [0, 1]; scales_log [N, 3] and quats [N, 4] as rendered;
        scale_idx / rot_idx [N, S] int64 codebook indices (None before the R-VQ phase: then the
        scales and rotations are the trained floats and the model cannot be saved yet);
        model: the :class:`CompactModel` holding codebooks, field, centre and radius.
    """

    def __init__(self, means, opacities, scales_log, quats, model: CompactModel, scale_idx=None, rot_idx=None) -> None:
        self.means, self.opacities, self.scales_log, self.quats = means, opacities, scales_log, quats
        self.model, self.scale_idx, self.rot_idx = model, scale_idx, rot_idx
        self._features = None

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @classmethod
    @torch.no_grad()
    def from_training(cls, params, model: CompactModel) -> "CompactGaussians":
        """The Gaussians the mask keeps, with scales and rotations quantized when R-VQ is active."""
        keep = ~model.masked(params)
        scales, quats = params["scales"].detach()[keep], F.normalize(params["quats"].detach()[keep], dim=-1)
        means, opac = params["means"].detach()[keep].clone(), torch.sigmoid(params["opacities"].detach()[keep])
        if not model.vq_active:
            return cls(means, opac, scales.clone(), quats, model)
        sidx, ridx = model.vq_scale.indices(scales), model.vq_rot.indices(quats)
        return cls(means, opac, model.vq_scale.decode(sidx), model.vq_rot.decode(ridx), model, sidx, ridx)

    def to(self, device) -> "CompactGaussians":
        idx = [None if t is None else t.to(device) for t in (self.scale_idx, self.rot_idx)]
        return CompactGaussians(self.means.to(device), self.opacities.to(device), self.scales_log.to(device),
                                self.quats.to(device), self.model.to(device), *idx)

    @torch.no_grad()
    def render(self, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, **kwargs):
        """Render like :meth:`splatting.gaussians.Gaussians.render` (colour from the field)."""
        m = self.model
        if self._features is None:  # the hash features depend on the centres only
            self._features = m.field.encode((self.means - m.centre) / m.radius)
        colors = m.field(self._features, self.means - _camera_centres(viewmats)[0])
        return rasterize(self.means, self.quats, torch.exp(self.scales_log), self.opacities, colors, viewmats, Ks,
                         width, height, **kwargs)

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path, post: bool = True) -> int:
        """Write one file (post-processed or plain, see the module docstring); its size in bytes."""
        if self.scale_idx is None:
            raise ValueError("CompactGaussians.save: scales and rotations are not quantized yet (the R-VQ phase "
                             "has not started); train past compact.vq_start_fraction")
        m = self.model
        opts = m.opts
        means, opac = self.means.cpu().numpy(), self.opacities.cpu().numpy()
        sidx, ridx = self.scale_idx.cpu().numpy(), self.rot_idx.cpu().numpy()
        meta = {"format": "compact3dgs", "post": post, "n": len(self), "options": opts.__dict__,
                "centre": m.centre.tolist(), "radius": float(m.radius), "huffman": {}}
        blobs: dict[str, bytes] = {}
        table = m.field.grid.table.detach().cpu()
        mlp = {k: v.detach().cpu() for k, v in m.field.mlp.state_dict().items()}
        codebooks = torch.cat([m.vq_scale.codebooks.detach().flatten(), m.vq_rot.codebooks.detach().flatten()]).cpu()
        if not post:
            blobs["means"] = means.astype(np.float32).tobytes()
            blobs["opacities"] = opac.astype(np.float32).tobytes()
            blobs["scale_idx"] = sidx.astype(_index_dtype(opts)).tobytes()
            blobs["rot_idx"] = ridx.astype(_index_dtype(opts)).tobytes()
            blobs["codebooks"] = codebooks.numpy().astype(np.float32).tobytes()
            blobs["table"] = table.numpy().astype(np.float32).tobytes()
            blobs["mlp"] = np.concatenate([v.flatten().numpy() for v in mlp.values()]).astype(np.float32).tobytes()
        else:
            order = morton_order(means)
            means, opac, sidx, ridx = means[order], opac[order], sidx[order], ridx[order]
            blobs["means"] = lzma.compress(means.astype(np.float16).tobytes())
            codes, lo, hi = quantize_uint8(torch.from_numpy(opac))
            meta["opacity_range"] = [lo, hi]
            blobs["opacities"] = lzma.compress(codes.numpy().tobytes())
            for name, idx in (("scale_idx", sidx), ("rot_idx", ridx)):
                for s in range(idx.shape[1]):
                    payload, tab = huffman_encode(idx[:, s])
                    blobs[f"{name}{s}"] = payload
                    meta["huffman"][f"{name}{s}"] = tab
            blobs["codebooks"] = codebooks.numpy().astype(np.float16).tobytes()
            tcodes, tlo, thi = quantize_uint8(table)
            meta["table_range"] = [tlo, thi]
            blobs["table"] = tcodes.numpy().tobytes()
            blobs["mlp"] = np.concatenate([v.flatten().numpy() for v in mlp.values()]).astype(np.float16).tobytes()
        return write_container(path, meta, blobs)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "CompactGaussians":
        """Read a file written by :meth:`save` (either kind).

        Raises:
            DataError: naming the file: not a Compact 3DGS file, a corrupt or truncated container,
                options no model can have, blobs of the wrong size for the Gaussian count and options,
                codebook indices beyond the codebooks, NaN / inf values.
        """
        meta, blobs = read_container(path)
        if meta.get("format") != "compact3dgs":
            raise DataError(f"{path}: not a Compact 3DGS file (format {meta.get('format')!r})")

        def blob(name: str, dtype, count: int, what: str, compressed: bool = False) -> np.ndarray:
            if name not in blobs:
                raise DataError(f"{path}: corrupt Compact 3DGS file: no {name!r} blob ({what})")
            data = lzma.decompress(blobs[name]) if compressed else blobs[name]
            size = np.dtype(dtype).itemsize
            if len(data) != count * size:
                raise DataError(f"{path}: corrupt Compact 3DGS file: blob {name!r} ({what}) holds {len(data)} bytes, "
                                f"expected {count} x {size} = {count * size} for n = {meta.get('n')} Gaussians and "
                                "the stored options")
            return np.frombuffer(data, dtype)

        try:
            opts = CompactOptions(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["options"].items()})
            n, post = meta["n"], meta["post"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(post, bool):
                raise DataError(f"{path}: corrupt Compact 3DGS file: n = {n!r}, post = {post!r}; expected a Gaussian "
                                "count >= 1 and true / false")
            centre = np.asarray(meta["centre"], np.float64)
            radius = meta["radius"]
            if centre.shape != (3,) or not np.isfinite(centre).all() or not (isinstance(radius, (int, float))
                                                                           and math.isfinite(radius) and radius > 0):
                raise DataError(f"{path}: corrupt Compact 3DGS file: field centre {meta['centre']!r} / radius "
                                f"{radius!r}; expected 3 finite numbers and a finite radius > 0")
            model = CompactModel(opts, torch.tensor(centre, dtype=torch.float32), float(radius))
            S, K = opts.vq_stages, opts.vq_codebook_size
            floats = np.float16 if post else np.float32  # codebooks and MLP
            n_table = model.field.grid.table.numel()
            n_mlp = sum(v.numel() for v in model.field.mlp.state_dict().values())
            if post:
                means = blob("means", np.float16, 3 * n, "float16 positions", compressed=True).astype(np.float32)
                codes = torch.from_numpy(blob("opacities", np.uint8, n, "8-bit opacities", compressed=True).copy())
                opac = dequantize_uint8(codes, *meta["opacity_range"]).numpy()
                idx = {}
                for name in ("scale_idx", "rot_idx"):
                    cols = []
                    for s_ in range(S):
                        key = f"{name}{s_}"
                        if key not in blobs or key not in meta["huffman"]:
                            raise DataError(f"{path}: corrupt Compact 3DGS file: no {key!r} blob or Huffman table "
                                            f"(options say {S} R-VQ stages)")
                        col = huffman_decode(blobs[key], meta["huffman"][key])
                        if len(col) != n:
                            raise DataError(f"{path}: corrupt Compact 3DGS file: {key!r} decodes to {len(col)} "
                                            f"indices, expected n = {n}")
                        cols.append(col)
                    idx[name] = np.stack(cols, 1)
                sidx, ridx = idx["scale_idx"], idx["rot_idx"]
                tcodes = torch.from_numpy(blob("table", np.uint8, n_table, "8-bit hash table").copy())
                table = dequantize_uint8(tcodes, *meta["table_range"])
            else:
                means = blob("means", np.float32, 3 * n, "float32 positions")
                opac = blob("opacities", np.float32, n, "float32 opacities")
                sidx = blob("scale_idx", _index_dtype(opts), n * S, "scale indices").reshape(n, S)
                ridx = blob("rot_idx", _index_dtype(opts), n * S, "rotation indices").reshape(n, S)
                table = torch.from_numpy(blob("table", np.float32, n_table, "float32 hash table").copy())
            cb = torch.from_numpy(blob("codebooks", floats, S * K * 7, "R-VQ codebooks").astype(np.float32))
            flat = torch.from_numpy(blob("mlp", floats, n_mlp, "colour MLP weights").astype(np.float32))
            for name, values in (("means", means), ("opacities", opac), ("codebooks", cb.numpy()),
                                 ("table", table.numpy()), ("mlp", flat.numpy())):
                bad = ~np.isfinite(values)
                if bad.any():
                    raise DataError(f"{path}: corrupt Compact 3DGS file: {int(bad.sum())} NaN / inf values in "
                                    f"{name!r} (first at element {int(np.argmax(bad))})")
            for name, values in (("scale_idx", sidx), ("rot_idx", ridx)):
                if values.size and (values.min() < 0 or values.max() >= K):
                    raise DataError(f"{path}: corrupt Compact 3DGS file: {name!r} holds index {int(values.max())}; "
                                    f"the codebooks have {K} entries (compact.vq_codebook_size)")
            k = S * K
            model.vq_scale.codebooks.data.copy_(cb[:k * 3].view(S, -1, 3))
            model.vq_rot.codebooks.data.copy_(cb[k * 3:].view(S, -1, 4))
            model.field.grid.table.data.copy_(table.view_as(model.field.grid.table))
            state, offset = {}, 0
            for name, v in model.field.mlp.state_dict().items():
                state[name] = flat[offset:offset + v.numel()].view_as(v)
                offset += v.numel()
            model.field.mlp.load_state_dict(state)
            model.vq_on.fill_(True)
            means = torch.from_numpy(means.reshape(n, 3).copy())
        except DataError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, lzma.LZMAError, EOFError) as e:
            raise DataError(f"{path}: corrupt Compact 3DGS file ({type(e).__name__}: {e})") from None
        sidx, ridx = torch.from_numpy(sidx.astype(np.int64)), torch.from_numpy(ridx.astype(np.int64))
        with torch.no_grad():
            g = cls(means, torch.from_numpy(np.asarray(opac, np.float32).copy()), model.vq_scale.decode(sidx),
                    model.vq_rot.decode(ridx), model.eval(), sidx, ridx)
        return g.to(device)
