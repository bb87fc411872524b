"""detection.models.dsvt: set partition against a per-window loop, attention against
nn.MultiheadAttention per set, permutation invariance, pooling, ONNX export."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from detection.models.dsvt import (AttentionPool3D, _attention, DSVTBackbone, DSVTOptions, SetAttentionLayer, export_onnx,
                                   pool_groups, set_partition, window_positions)
from perception3d.errors import ConfigError, DataError
from perception3d.sparse import SparseVoxels

SMALL = DSVTOptions(d_model=32, num_heads=4, ffn_dim=64, set_size=6, window_shape=(4, 4, 2),
                    shifted_window_shape=(6, 6, 2), stage_blocks=(1, 1), pool_size=(1, 1, 2))


def random_coords(seed: int, shape=(4, 30, 26), n=400, batch_size=2) -> torch.Tensor:
    """Unique (b, z, y, x) rows, clustered so windows hold 1 to ~30 voxels."""
    g = torch.Generator().manual_seed(seed)
    Z, Y, X = shape
    rows = []
    for b in range(batch_size):
        centres = torch.stack([torch.randint(0, Y, (6,), generator=g), torch.randint(0, X, (6,), generator=g)], 1)
        pick = centres[torch.randint(0, 6, (n,), generator=g)]
        y = (pick[:, 0] + torch.randint(-4, 5, (n,), generator=g)).clamp(0, Y - 1)
        x = (pick[:, 1] + torch.randint(-4, 5, (n,), generator=g)).clamp(0, X - 1)
        z = torch.randint(0, Z, (n,), generator=g)
        rows.append(torch.stack([torch.full_like(x, b), z, y, x], 1))
    return torch.unique(torch.cat(rows), dim=0).int()


def loop_partition(coords, window, shift, tau):
    """The specification, one window at a time: {window key: (y-major voxel ids, x-major ids, pad)}."""
    wx, wy, wz = window
    sx, sy, sz = shift
    wins: dict[tuple, list] = {}
    for i, (b, z, y, x) in enumerate(coords.tolist()):
        X, Y, Zs = x + sx, y + sy, z + sz
        wins.setdefault((b, Zs // wz, Y // wy, X // wx), []).append((Y % wy, X % wx, Zs % wz, i))
    out = {}
    for key, members in wins.items():
        n = len(members)
        ys = [m[3] for m in sorted(members, key=lambda m: (m[0], m[1], m[2]))]
        xs = [m[3] for m in sorted(members, key=lambda m: (m[1], m[0], m[2]))]
        s = math.ceil(n / tau)
        sets_y, sets_x, pads = [], [], []
        for j in range(s):
            idx = [(j * tau + k) * n // (s * tau) for k in range(tau)]
            sets_y.append([ys[i] for i in idx])
            sets_x.append([xs[i] for i in idx])
            pads.append([k > 0 and idx[k] == idx[k - 1] for k in range(tau)])
        out[key] = (sets_y, sets_x, pads)
    return out


@pytest.mark.parametrize("window,shift,tau", [((4, 4, 2), (0, 0, 0), 6), ((6, 6, 2), (3, 3, 0), 6),
                                              ((12, 12, 1), (6, 6, 0), 36)])
def test_set_partition_matches_the_per_window_specification(window, shift, tau):
    coords = random_coords(0)
    if window[2] == 1:
        coords = torch.unique(coords * torch.tensor([1, 0, 1, 1], dtype=torch.int32), dim=0)  # pillars
    part = set_partition(coords, (4, 30, 26), window, shift, tau)
    ref = loop_partition(coords, window, shift, tau)
    assert part.voxels.shape[1] == sum(len(v[0]) for v in ref.values())
    # group our sets by window and compare slot by slot with the loop
    got: dict[int, list] = {}
    for t in range(part.voxels.shape[1]):
        w = part.window[part.voxels[0, t]]
        assert (w == w[0]).all() and (part.window[part.voxels[1, t]] == w[0]).all(), "a set crosses windows"
        got.setdefault(int(w[0]), []).append(t)
    assert len(got) == len(ref)
    by_first_voxel = {v[0][0][0]: v for v in ref.values()}
    for rows in got.values():
        sets_y, sets_x, pads = by_first_voxel[int(part.voxels[0, rows[0], 0])]
        assert part.voxels[0, rows].tolist() == sets_y
        assert part.voxels[1, rows].tolist() == sets_x
        assert part.pad[rows].tolist() == pads
    # complete: every voxel in an unpadded slot of both orders; the orders differ
    for o in range(2):
        seen = torch.zeros(len(coords), dtype=torch.bool)
        seen[part.voxels[o][~part.pad]] = True
        assert seen.all()
    assert not torch.equal(part.voxels[0], part.voxels[1])
    # in-window cell
    pos = window_positions(window)
    c = coords.long()
    local = torch.stack([(c[:, 3] + shift[0]) % window[0], (c[:, 2] + shift[1]) % window[1],
                         (c[:, 1] + shift[2]) % window[2]], 1).float()
    size = torch.tensor(window, dtype=torch.float32)
    torch.testing.assert_close(pos[part.cell], (local - (size - 1) / 2) / size)


def test_compact_buckets_hold_each_sets_unpadded_voxels():
    coords = random_coords(1)
    part = set_partition(coords, (4, 30, 26), (6, 6, 2), (3, 3, 0), 6)
    *buckets, slot = part.compact(step=2)
    got = []
    for sets, mask in zip(buckets[0::2], buckets[1::2]):
        for t in range(sets.shape[1]):
            got.append(tuple(sets[0, t][mask[t]].tolist()))
    want = [tuple(part.voxels[0, t][~part.pad[t]].tolist()) for t in range(part.voxels.shape[1])]
    assert sorted(got) == sorted(want)
    flat = torch.cat([s[0].flatten() for s in buckets[0::2]])
    assert torch.equal(flat[slot[0]], torch.arange(len(coords)))


def mha_like(module) -> nn.MultiheadAttention:
    """nn.MultiheadAttention holding ``module``'s projection weights (same q, k, v row layout)."""
    d = module.out_proj.in_features
    mha = nn.MultiheadAttention(d, module.num_heads, batch_first=True)
    mha.in_proj_weight.data.copy_(module.in_proj.weight)
    mha.in_proj_bias.data.copy_(module.in_proj.bias)
    mha.out_proj.load_state_dict(module.out_proj.state_dict())
    return mha


def reference_layer(layer: SetAttentionLayer, x, part, order: int, window):
    """The layer with nn.MultiheadAttention run set by set on the specified [T, tau] sets."""
    mha = mha_like(layer)
    h = x + layer.pos(window_positions(window))[part.cell]
    out = torch.full_like(x, float("nan"))
    for t in range(part.voxels.shape[1]):
        vox = part.voxels[order, t]
        q = h[vox][None]
        o, _ = mha(q, q, x[vox][None], key_padding_mask=part.pad[t][None])
        for k, v in enumerate(vox.tolist()):
            if not part.pad[t, k] and torch.isnan(out[v, 0]):
                out[v] = o[0, k]
    y = layer.norm1(x + out)
    return layer.norm2(y + layer.ffn(y))


def _layer_case(order: int):
    """A set-attention layer, its input and its arguments for `order` on 200 random voxels."""
    torch.manual_seed(0)
    coords = random_coords(2, n=200)
    window = (6, 6, 2)
    part = set_partition(coords, (4, 30, 26), window, (3, 3, 0), 6)
    *buckets, slot = part.compact(step=2)
    layer = SetAttentionLayer(32, 4, 64).eval()
    x = torch.randn(len(coords), 32)
    args = ([s[order] for s in buckets[0::2]], buckets[1::2], slot[order], part.cell, window_positions(window))
    return layer, x, args, part, window


@pytest.mark.parametrize("order", [0, 1])
def test_set_attention_equals_multihead_attention_per_set(order):
    layer, x, args, part, window = _layer_case(order)
    with torch.no_grad():
        ours = layer(x, *args)
        ref = reference_layer(layer, x, part, order, window)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_set_attention_under_bf16_autocast():
    """Under bf16 autocast (`train.precision=bf16`) the projections run in bf16 and the attention
    in fp32: the layer stays within bf16 rounding of the fp32 layer."""
    layer, x, args, _, _ = _layer_case(0)
    with torch.no_grad():
        ref = layer(x, *args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = layer(x, *args)
            q = torch.randn(5, 4, 30, 8).bfloat16()
            mask = torch.ones(5, 1, 1, 30, dtype=torch.bool)
            attn = _attention(q, q, q, mask)
    assert attn.dtype == torch.float32
    assert torch.allclose(attn, _attention(q.float(), q.float(), q.float(), mask), atol=1e-6)
    err = (ours.float() - ref).abs().max().item()
    assert 0 < err < 0.05, err  # outputs are layer-normed (unit scale): bf16 keeps ~3 digits


def test_one_full_set_per_window_is_plain_attention_per_window():
    """Every window holds exactly tau voxels: one set, no padding, plain MHA over the window."""
    torch.manual_seed(0)
    tau, w = 8, (4, 4, 1)
    rows = []
    for wy in range(3):
        for wx in range(3):
            cells = torch.randperm(16)[:tau]
            rows += [[0, 0, wy * 4 + int(c) // 4, wx * 4 + int(c) % 4] for c in cells]
    coords = torch.tensor(rows, dtype=torch.int32)
    part = set_partition(coords, (1, 12, 12), w, (0, 0, 0), tau)
    assert part.voxels.shape[1] == 9 and not part.pad.any()
    *buckets, slot = part.compact()
    layer = SetAttentionLayer(32, 4, 64).eval()
    x = torch.randn(len(coords), 32)
    mha = mha_like(layer)
    with torch.no_grad():
        ours = layer(x, [s[0] for s in buckets[0::2]], buckets[1::2], slot[0], part.cell, window_positions(w))
        h = x + layer.pos(window_positions(w))[part.cell]
        ref = torch.empty_like(x)
        for win in range(9):
            members = (part.window == win).nonzero().flatten()
            o, _ = mha(h[members][None], h[members][None], x[members][None])
            ref[members] = o[0]
        ref = layer.norm1(x + ref)
        ref = layer.norm2(ref + layer.ffn(ref))
    assert (ours - ref).abs().max().item() <= 1e-5


def test_attention_pooling_against_a_loop():
    torch.manual_seed(0)
    coords = random_coords(3, n=150)
    pooled, member_slot = pool_groups(coords, (1, 1, 2))
    pool = AttentionPool3D(32, 4, (1, 1, 2)).eval()
    x = torch.randn(len(coords), 32)
    mha = mha_like(pool)
    with torch.no_grad():
        ours = pool(x, member_slot, pooled)
        c = coords.long()
        for p, key in enumerate(pooled.long().tolist()):
            members = ((c // torch.tensor([1, 2, 1, 1])) == torch.tensor(key)).all(1).nonzero().flatten()
            q = x[members].amax(0)
            o, _ = mha(q[None, None], x[members][None], x[members][None])
            ref = pool.norm(q + o[0, 0])
            assert (ours[p] - ref).abs().max().item() <= 1e-5


def test_backbone_is_invariant_to_voxel_order():
    torch.manual_seed(0)
    coords = random_coords(4)
    feats = torch.randn(len(coords), 5)
    net = DSVTBackbone(5, (4, 30, 26), SMALL).eval()
    perm = torch.randperm(len(coords))
    with torch.no_grad():
        a = net.forward_sparse(SparseVoxels(feats, coords, (4, 30, 26), 2))
        b = net.forward_sparse(SparseVoxels(feats[perm], coords[perm], (4, 30, 26), 2))
        bev_a, _ = net(SparseVoxels(feats, coords, (4, 30, 26), 2))
        bev_b, _ = net(SparseVoxels(feats[perm], coords[perm], (4, 30, 26), 2))
    assert torch.equal(a.coords, b.coords) and a.spatial_shape == (2, 30, 26)
    assert (a.feats - b.feats).abs().max().item() <= 1e-5
    assert bev_a.shape == (2, 32, 30, 26) and (bev_a - bev_b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("stage_blocks, patch, shape, channels, skip",
                         [((1, 1), 1, (4, 30, 26), 0, False), ((1, 1), 2, (4, 30, 26), 0, False),
                          ((1,), 4, (1, 30, 26), 0, False), ((1,), 4, (1, 30, 26), 48, True),
                          ((1,), 1, (1, 30, 26), 0, True)])
def test_bev_fold_equals_a_strided_conv_on_the_stacked_heights(stage_blocks, patch, shape, channels, skip):
    """The voxel variant's height fold (patch 1), heights and 2x2 cells, 0.2 m-style pillars
    folded into 4x4 cells (30 x 26 not divisible by 4: the last row and column of cells are
    partial), and the same with the input features beside the transformed ones (bev_skip), into
    48 BEV channels, or into d_model channels for unfolded pillars."""
    torch.manual_seed(0)
    coords = random_coords(5, shape)
    opts = dataclasses.replace(SMALL, stage_blocks=stage_blocks, bev_patch=patch, bev_channels=channels,
                               bev_skip=skip)
    net = DSVTBackbone(5, shape, opts).eval()
    C = channels or 32
    with torch.no_grad():
        feats = torch.randn(len(coords), 5)
        out = net.forward_sparse(SparseVoxels(feats, coords, shape, 2))
        bev, stride = net(SparseVoxels(feats, coords, shape, 2))
        if skip:
            out = SparseVoxels(torch.cat([out.feats, feats], 1), out.coords, out.spatial_shape, 2)
        dense = out.dense()  # [B, c, Z', Y, X]; the reference stacks the levels z-major, c minor
        c, Z = dense.shape[1:3]
        stacked = dense.permute(0, 2, 1, 3, 4).reshape(2, Z * c, 30, 26)
        stacked = torch.nn.functional.pad(stacked, (0, -26 % patch, 0, -30 % patch))
        ref = torch.nn.functional.conv2d(stacked, net.bev_fold.weight.view(C, Z * c, patch, patch), stride=patch)
    assert c == 32 + 5 * skip
    assert stride == patch and bev.shape == ref.shape == (2, C, -(-30 // patch), -(-26 // patch))
    assert net.bev_shape == bev.shape[1:]
    assert (bev - ref).abs().max().item() <= 1e-5 and ref.abs().max().item() > 0.1


def test_bev_skip_needs_one_stage():
    with pytest.raises(ConfigError, match="bev_skip"):
        dataclasses.replace(SMALL, stage_blocks=(1, 1), bev_skip=True)


def test_pool_groups_matches_unique_rows():
    coords = random_coords(6)
    pooled, member_slot = pool_groups(coords, (2, 3, 2))
    ref, inverse = torch.unique(coords.long() // torch.tensor([1, 2, 3, 2]), dim=0, return_inverse=True)
    assert torch.equal(pooled.long(), ref)
    assert torch.equal(member_slot // 12, inverse)


def test_backbone_rejects_bad_input():
    net = DSVTBackbone(5, (4, 30, 26), SMALL)
    with pytest.raises(DataError, match="no voxels"):
        net.plan(torch.zeros((0, 4), dtype=torch.int32))
    with pytest.raises(DataError, match="spatial_shape"):
        net.forward_sparse(SparseVoxels(torch.zeros(1, 5), torch.zeros(1, 4, dtype=torch.int32), (4, 30, 27), 1))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = DSVTBackbone(5, (4, 30, 26), SMALL).eval()
    coords = random_coords(5)
    names = export_onnx(net, torch.randn(len(coords), 5), coords, tmp_path / "dsvt.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["dsvt.onnx"]  # no temporary file left
    sess = ort.InferenceSession(str(tmp_path / "dsvt.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names
    for seed in (6, 7):  # other voxel and set counts than the export example
        coords = random_coords(seed, n=300 + 100 * seed)
        feats = torch.randn(len(coords), 5)
        plan, _ = net.plan(coords)
        with torch.no_grad():
            ref = net.run(feats, plan)
        out = sess.run(None, {n: t.numpy() for n, t in zip(names, (feats, *plan))})[0]
        assert out.shape == tuple(ref.shape)
        assert abs(out - ref.numpy()).max() <= 1e-4
