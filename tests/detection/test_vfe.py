"""detection.models.vfe: the pillar feature net against naive per-point loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detection.models.vfe import PillarVFE
from perception3d.errors import DataError
from perception3d.ops.voxelize import voxelize_dynamic
from tests.perception3d.test_voxelize import PR, make_cloud


@pytest.mark.parametrize("filters,normalize", [(16, False), ((16, 8), False), ((16, 8), True)],
                         ids=["one_layer", "two_layers", "two_layers_normalized"])
def test_pillar_vfe_matches_naive(filters, normalize):
    torch.manual_seed(0)
    pts = make_cloud(9)
    pillar_vs = (0.5, 0.25, 2.0)  # one voxel in z: pillars
    p2v, coords = voxelize_dynamic(pts, pillar_vs, PR)
    assert coords[:, 0].max().item() == 0
    vfe = PillarVFE(4, filters, pillar_vs, PR, normalize_inputs=normalize).eval()
    with torch.no_grad():
        for bn in vfe.norms:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        out = vfe(pts, p2v, coords)
    layers = []  # (W, BN scale, BN shift) per PFN layer, float64
    for linear, bn in zip(vfe.linears, vfe.norms):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        layers.append((linear.weight.detach().double().numpy(), scale.detach().double().numpy(),
                       (bn.bias - bn.running_mean * scale).detach().double().numpy()))
    # naive: per pillar, loop over its points, layer by layer
    P = pts.double().numpy()
    ref = np.zeros((coords.shape[0], vfe.out_channels))
    for v, (z, y, x) in enumerate(coords.tolist()):
        members = [i for i, pv in enumerate(p2v.tolist()) if pv == v]
        mean = P[members, :3].mean(axis=0)
        centre = np.array([(x + 0.5) * pillar_vs[0] + PR[0], (y + 0.5) * pillar_vs[1] + PR[1],
                           (z + 0.5) * pillar_vs[2] + PR[2]])
        if normalize:  # coordinates to [-1, 1] over the range, offsets in voxel sizes
            lo, hi, size = np.array(PR[:3]), np.array(PR[3:]), np.array(pillar_vs)
            feats = [np.concatenate([(P[i, :3] - (lo + hi) / 2) / ((hi - lo) / 2), P[i, 3:],
                                     (P[i, :3] - mean) / size, (P[i, :3] - centre) / size]) for i in members]
        else:
            feats = [np.concatenate([P[i], P[i, :3] - mean, P[i, :3] - centre]) for i in members]
        for k, (W, scale, shift) in enumerate(layers):
            feats = [np.maximum((W @ f) * scale + shift, 0.0) for f in feats]
            best = np.max(feats, axis=0)
            if k < len(layers) - 1:
                feats = [np.concatenate([f, best]) for f in feats]
        ref[v] = best
    assert np.abs(out.numpy() - ref).max() <= 1e-4


@pytest.mark.parametrize("vs,bins", [((0.5, 0.25, 2.0), 8), ((0.5, 0.25, 0.5), 5)], ids=["pillars", "voxels"])
def test_pillar_vfe_height_profile_matches_naive(vs, bins):
    pts = make_cloud(12)
    p2v, coords = voxelize_dynamic(pts, vs, PR)
    vfe = PillarVFE(4, 8, vs, PR, height_bins=bins).eval()
    with torch.no_grad():
        out = vfe(pts, p2v, coords)
    assert out.shape == (coords.shape[0], 8 + bins)
    plain = PillarVFE(4, 8, vs, PR).eval()
    plain.load_state_dict(vfe.state_dict())
    assert torch.equal(out[:, :8], plain(pts, p2v, coords))  # the PFN part is unchanged
    # naive: per voxel and bin, the max over the voxel's points of the tent weight at the bin centre
    h = vs[2] / bins
    ref = np.zeros((coords.shape[0], bins))
    for i, v in enumerate(p2v.tolist()):
        if v < 0:
            continue
        bottom = PR[2] + coords[v, 0].item() * vs[2]
        for k in range(bins):
            centre = bottom + (k + 0.5) * h
            ref[v, k] = max(ref[v, k], max(0.0, 1.0 - abs(pts[i, 2].item() - centre) / h))
    assert np.abs(out[:, 8:].numpy() - ref).max() <= 1e-5
    assert (ref.max(1) >= 0.5 - 1e-6).all(), ref.max(1).min()  # every voxel's points reach at least one bin by half
    with pytest.raises(DataError, match="height_bins"):
        PillarVFE(4, 8, vs, PR, height_bins=-1)


def test_pillar_vfe_loads_one_layer_checkpoints_of_before_stacking():
    pts = make_cloud(11)
    pillar_vs = (0.5, 0.25, 2.0)
    p2v, coords = voxelize_dynamic(pts, pillar_vs, PR)
    vfe = PillarVFE(4, 8, pillar_vs, PR).eval()
    with torch.no_grad():
        vfe.norms[0].running_mean.uniform_(-0.5, 0.5)
    old = {k.replace("linears.0.", "linear.").replace("norms.0.", "norm."): v for k, v in vfe.state_dict().items()}
    assert "linear.weight" in old and "norm.running_mean" in old
    loaded = PillarVFE(4, 8, pillar_vs, PR).eval()
    loaded.load_state_dict(old)
    assert torch.equal(loaded(pts, p2v, coords), vfe(pts, p2v, coords))


def test_pillar_vfe_backward_and_train_mode():
    pts = make_cloud(10)
    pillar_vs = (0.5, 0.25, 2.0)
    p2v, coords = voxelize_dynamic(pts, pillar_vs, PR)
    vfe = PillarVFE(4, (8, 8), pillar_vs, PR)
    out = vfe(pts, p2v, coords)
    assert out.shape == (coords.shape[0], 8)
    out.sum().backward()
    assert vfe.linears[0].weight.grad is not None and vfe.linears[0].weight.grad.abs().sum().item() > 0
