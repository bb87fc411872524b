"""splatting.compact building blocks: hash grid vs a per-point loop, contraction, k-means, R-VQ,
the straight-through mask, Huffman coding, Morton order and the container."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perception3d.errors import DataError
from splatting.compact.codec import (huffman_decode, huffman_encode, morton_order, read_container,
                                     write_container)
from splatting.compact.hashgrid import ColorField, HashGrid, contract
from splatting.compact.quantize import (ResidualVQ, binary_mask, dequantize_uint8, kmeans, quantize_uint8)


def naive_hash_features(grid: HashGrid, x: torch.Tensor) -> torch.Tensor:
    """One point and one level at a time, straight from the Instant-NGP description."""
    primes = (1, 2654435761, 805459861)
    T = grid.table_size
    rows = []
    for p in x.tolist():
        feats = []
        for level in range(grid.num_levels):
            n = int(math.floor(16 * (512 / 16) ** (level / (grid.num_levels - 1)) + 1e-6))
            assert n == int(grid.resolution[level])
            pos = [min(max(c, 0.0), 1.0) * n for c in p]
            base = [math.floor(c) for c in pos]
            f = torch.zeros(grid.features_per_level, dtype=x.dtype)
            for dx in (0, 1):
                for dy in (0, 1):
                    for dz in (0, 1):
                        v = (base[0] + dx, base[1] + dy, base[2] + dz)
                        w = 1.0
                        for c, d in zip(range(3), (dx, dy, dz)):
                            t = pos[c] - base[c]
                            w *= t if d else 1 - t
                        if (n + 1) ** 3 <= T:
                            idx = (v[0] + v[1] * (n + 1) + v[2] * (n + 1) ** 2) % T
                        else:
                            idx = ((v[0] * primes[0]) ^ (v[1] * primes[1]) ^ (v[2] * primes[2])) % T
                        f = f + w * grid.table[level, idx]
            feats.append(f)
        rows.append(torch.cat(feats))
    return torch.stack(rows)


def test_hash_grid_matches_the_per_point_reference_values_and_gradients():
    torch.manual_seed(0)
    grid = HashGrid(num_levels=6, features_per_level=2, log2_table_size=13, min_resolution=16,
                    max_resolution=512, init_scale=1.0).double()
    assert bool(grid.dense[0]) and not bool(grid.dense[-1])  # both indexing modes are exercised
    x = torch.rand(16, 3, dtype=torch.float64)
    x[0] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # on the boundary
    ours = grid(x)
    g = torch.randn_like(ours)
    (ours * g).sum().backward()
    grad_ours = grid.table.grad.clone()
    grid.table.grad = None
    ref = naive_hash_features(grid, x)
    (ref * g).sum().backward()
    assert (ours - ref).abs().max().item() < 1e-12
    assert (grad_ours - grid.table.grad).abs().max().item() < 1e-12


def test_contraction_known_values():
    x = torch.tensor([[0.5, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, -4.0, 0.0], [1e6, 0.0, 0.0]])
    c = contract(x)
    torch.testing.assert_close(c, torch.tensor([[0.5, 0, 0], [2 - 1 / 3, 0, 0], [0, -(2 - 1 / 4), 0], [2 - 1e-6, 0, 0]]))


def test_color_field_is_view_dependent_and_in_range():
    torch.manual_seed(0)
    field = ColorField(HashGrid(num_levels=4, log2_table_size=10, init_scale=0.5), hidden=16)
    means = torch.randn(50, 3)
    feats = field.encode(means)
    a = field(feats, torch.tensor([[0.0, 0.0, 1.0]]).expand(50, 3))
    b = field(feats, torch.tensor([[1.0, 0.0, 0.0]]).expand(50, 3))
    assert a.shape == (50, 3) and bool(((a > 0) & (a < 1)).all())
    assert (a - b).abs().max().item() > 1e-3


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres[:, None] + 0.1 * torch.randn(4, 200, 2, generator=g)).reshape(-1, 2)
    found = kmeans(x, 4, seed=1)
    d = torch.cdist(found, centres)
    assert d.min(1).values.max().item() < 0.05 and len(set(d.argmin(1).tolist())) == 4


def test_residual_vq_error_falls_with_stages_and_is_straight_through():
    torch.manual_seed(0)
    x = torch.randn(2000, 3)
    errors = []
    for stages in (1, 2, 4):
        vq = ResidualVQ(3, num_stages=stages, codebook_size=16)
        vq.init_kmeans(x, iters=10)
        idx = vq.indices(x)
        assert idx.shape == (2000, stages) and int(idx.max()) < 16
        errors.append(((vq.decode(idx) - x) ** 2).sum(1).mean().item())
    assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2]
    xp = x.clone().requires_grad_(True)
    out, loss = vq(xp)
    torch.testing.assert_close(out, vq.decode(idx))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    torch.testing.assert_close(xp.grad, upstream + 0 * xp.grad)  # identity gradient through the quantizer
    vq.zero_grad()
    loss.backward()
    assert vq.codebooks.grad.abs().sum().item() > 0


def test_binary_mask_is_hard_forward_and_sigmoid_backward():
    logits = torch.tensor([-10.0, -4.0, 0.0, 3.0], requires_grad=True)
    m = binary_mask(logits, threshold=0.01)
    assert m.tolist() == [0.0, 1.0, 1.0, 1.0]  # sigmoid(-4) = 0.018 > 0.01
    m.sum().backward()
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, s * (1 - s))


def test_uint8_quantization_error_is_half_a_step():
    x = torch.linspace(-3, 5, 1001)
    codes, lo, hi = quantize_uint8(x)
    assert codes.dtype == torch.uint8 and (lo, hi) == (-3.0, 5.0)
    assert (dequantize_uint8(codes, lo, hi) - x).abs().max().item() <= 0.5 * 8 / 255 + 1e-6


def test_huffman_round_trip_is_exact_and_near_the_entropy():
    rng = np.random.default_rng(0)
    p = np.exp(-np.arange(64) / 6.0)
    p /= p.sum()
    symbols = rng.choice(64, size=20000, p=p)
    payload, table = huffman_encode(symbols)
    assert np.array_equal(huffman_decode(payload, table), symbols)
    _, counts = np.unique(symbols, return_counts=True)
    q = counts / counts.sum()
    entropy_bits = -(q * np.log2(q)).sum() * len(symbols)
    assert entropy_bits <= table["bits"] <= entropy_bits + len(symbols)  # Huffman: within 1 bit/symbol
    assert len(payload) < 20000 * 6 / 8  # smaller than fixed 6-bit codes
    for edge in (np.zeros(0, np.int64), np.full(7, 5)):
        payload, table = huffman_encode(edge)
        assert np.array_equal(huffman_decode(payload, table), edge)


def test_morton_order_of_a_cube_follows_the_z_curve():
    corners = np.array([[x, y, z] for z in (0, 1) for y in (0, 1) for x in (0, 1)], np.float32)
    shuffled = corners[np.random.default_rng(0).permutation(8)]
    order = morton_order(shuffled)
    assert np.array_equal(shuffled[order], corners)  # x bit lowest, then y, then z


def test_container_round_trip_and_bad_files(tmp_path):
    path = tmp_path / "scene.cgs"
    size = write_container(path, {"n": 3, "name": "x"}, {"a": b"\x00\x01", "b": b"hello"})
    assert size == path.stat().st_size and not list(tmp_path.glob("*.tmp*"))
    meta, blobs = read_container(path)
    assert meta == {"n": 3, "name": "x"} and blobs == {"a": b"\x00\x01", "b": b"hello"}
    bad = tmp_path / "bad.cgs"
    bad.write_bytes(b"not a file")
    with pytest.raises(DataError, match="magic"):
        read_container(bad)
    bad.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_container(bad)


def _random_compact(n: int = 3000, seed: int = 0):
    from splatting.compact.model import CompactGaussians, CompactModel, CompactOptions

    g = torch.Generator().manual_seed(seed)
    opts = CompactOptions(hash_levels=4, hash_log2_size=10, mlp_hidden=16, vq_stages=3, vq_codebook_size=32)
    model = CompactModel(opts, torch.zeros(3), 1.5)
    with torch.no_grad():
        model.field.grid.table.uniform_(-0.5, 0.5, generator=g)
    params = {"means": torch.rand(n, 3, generator=g) * 2 - 1,
              "scales": torch.log(0.02 + 0.03 * torch.rand(n, 3, generator=g)),
              "quats": torch.randn(n, 4, generator=g), "opacities": torch.randn(n, generator=g),
              "mask": torch.where(torch.rand(n, generator=g) < 0.25, -8.0, 2.0)}
    assert not model.vq_active
    plain = CompactGaussians.from_training(params, model)
    assert len(plain) == int((params["mask"] > 0).sum()) and plain.scale_idx is None
    model.start_vq(params)
    return CompactGaussians.from_training(params, model), model, params


def _camera(width=64, height=48):
    viewmat = torch.eye(4)
    viewmat[2, 3] = 3.0  # camera at z = -3 looking along +z at the unit cube
    K = torch.tensor([[60.0, 0, width / 2], [0, 60.0, height / 2], [0, 0, 1]])
    return viewmat[None], K[None], width, height


def test_compact_file_round_trips_render_like_the_model(tmp_path):
    g, model, params = _random_compact()
    vm, K, W, H = _camera()
    ref = g.render(vm, K, W, H)[0]
    assert ref.std().item() > 0.05  # a non-trivial image
    # the model under training renders the same (quantized) Gaussians; masked ones are invisible
    train_rgb = model.render(params, vm, K, W, H)[0]
    assert (train_rgb - ref).abs().max().item() < 1e-5
    from splatting.compact.model import CompactGaussians

    size_plain = g.save(tmp_path / "plain.cgs", post=False)
    size_post = g.save(tmp_path / "post.cgs", post=True)
    plain = CompactGaussians.load(tmp_path / "plain.cgs")
    post = CompactGaussians.load(tmp_path / "post.cgs")
    assert len(plain) == len(post) == len(g)
    assert (plain.render(vm, K, W, H)[0] - ref).abs().max().item() < 1e-6
    err = (post.render(vm, K, W, H)[0] - ref).abs()
    assert err.mean().item() < 1e-3 and err.max().item() < 0.01  # float16 positions, 8-bit table
    assert size_post < 0.5 * size_plain
    (tmp_path / "bad.cgs").write_bytes((tmp_path / "post.cgs").read_bytes()[:200])
    with pytest.raises(DataError):
        CompactGaussians.load(tmp_path / "bad.cgs")


def test_hash_grid_cpu_kernel_matches_the_torch_path():
    torch.manual_seed(0)
    grid = HashGrid(num_levels=8, features_per_level=2, log2_table_size=12, init_scale=0.5)
    x = torch.rand(5000, 3) * 1.2 - 0.1  # some points outside [0, 1]: clamped, zero position gradient
    x.requires_grad_(True)
    g = torch.randn(5000, 16)
    (grid(x) * g).sum().backward()
    gx, gt = x.grad.clone(), grid.table.grad.clone()
    x.grad, grid.table.grad = None, None
    ref = grid.forward_torch(x)
    (ref * g).sum().backward()
    assert (grid(x) - ref).abs().max().item() < 1e-5
    assert (gt - grid.table.grad).abs().max().item() < 1e-4
    assert (gx - x.grad).abs().max().item() < 1e-3 * x.grad.abs().max().item()
