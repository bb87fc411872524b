"""perception3d.sparse: spconv CPU fixes checked against dense conv3d with 2 torch threads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perception3d.errors import DataError
from perception3d.sparse import SparseVoxels, spconv, spconv_native_cpu_kernels

S = 24  # grid side
N = 3000  # active voxels
C_IN, C_OUT = 4, 8


@pytest.fixture(autouse=True)
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def random_voxels(seed: int, batch_size: int = 2, n: int = N, c: int = C_IN) -> SparseVoxels:
    g = torch.Generator().manual_seed(seed)
    lin = torch.randperm(batch_size * S**3, generator=g)[:n]
    b, r = lin // S**3, lin % S**3
    coords = torch.stack([b, r // (S * S), (r // S) % S, r % S], 1).int()
    feats = torch.randn(n, c, generator=g)
    return SparseVoxels(feats, coords, (S, S, S), batch_size)


def dense_weight(conv) -> torch.Tensor:
    """spconv KRSC weight [Cout, kz, ky, kx, Cin] -> torch conv3d weight [Cout, Cin, kz, ky, kx]."""
    return conv.weight.permute(0, 4, 1, 2, 3)


def gather_sites(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    c = coords.long()
    return dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


def compare_with_dense(conv, sv: SparseVoxels, dense_fn, seed: int = 0):
    """Max abs errors (forward, input grad, weight grad / |ref| max) of conv vs dense_fn."""
    feats = sv.feats.clone().requires_grad_(True)
    x = SparseVoxels(feats, sv.coords, sv.spatial_shape, sv.batch_size)
    y = conv(x.to_spconv())
    out = SparseVoxels.from_spconv(y)
    ref_dense = dense_fn(x.dense())
    ref = gather_sites(ref_dense, out.coords)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    ga = torch.autograd.grad((out.feats * g).sum(), [feats, conv.weight])
    gb = torch.autograd.grad((ref * g).sum(), [feats, conv.weight])
    return (
        (out.feats - ref).abs().max().item(),
        (ga[0] - gb[0]).abs().max().item(),
        ((ga[1] - gb[1]).abs().max() / gb[1].abs().max()).item(),
        out,
        ref_dense,
    )


def test_subm_conv_matches_dense():
    torch.manual_seed(0)
    sv = random_voxels(1)
    conv = spconv.SubMConv3d(C_IN, C_OUT, 3, bias=False)
    e_fwd, e_din, e_dw, out, _ = compare_with_dense(conv, sv, lambda d: F.conv3d(d, dense_weight(conv), padding=1))
    assert torch.equal(out.coords, sv.coords)  # submanifold: same active set
    assert e_fwd <= 1e-4 and e_din <= 1e-4 and e_dw <= 1e-5, (e_fwd, e_din, e_dw)


def test_strided_sparse_conv_matches_dense():
    torch.manual_seed(0)
    sv = random_voxels(2)
    conv = spconv.SparseConv3d(C_IN, C_OUT, 3, stride=2, padding=1, bias=False)
    e_fwd, e_din, e_dw, out, ref_dense = compare_with_dense(
        conv, sv, lambda d: F.conv3d(d, dense_weight(conv), stride=2, padding=1)
    )
    assert e_fwd <= 1e-4 and e_din <= 1e-4 and e_dw <= 1e-5, (e_fwd, e_din, e_dw)
    # the whole dense output (zeros off the output active set) matches too
    assert out.spatial_shape == tuple(ref_dense.shape[2:])
    assert (out.dense() - ref_dense).abs().max().item() <= 1e-4


def test_anisotropic_stride_conv_matches_dense():
    """Kernel (3,1,1) stride (2,1,1), as in SECOND's z-collapsing layer."""
    torch.manual_seed(0)
    sv = random_voxels(3, n=2000)
    conv = spconv.SparseConv3d(C_IN, C_OUT, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False)
    e_fwd, e_din, e_dw, out, ref_dense = compare_with_dense(
        conv, sv, lambda d: F.conv3d(d, dense_weight(conv), stride=(2, 1, 1))
    )
    assert e_fwd <= 1e-4 and e_din <= 1e-4 and e_dw <= 1e-5, (e_fwd, e_din, e_dw)


def test_inverse_conv_matches_dense_transpose():
    torch.manual_seed(0)
    sv = random_voxels(4)
    down = spconv.SparseConv3d(C_IN, C_OUT, 3, stride=2, padding=1, bias=False, indice_key="d1")
    up = spconv.SparseInverseConv3d(C_OUT, C_IN, 3, indice_key="d1", bias=False)
    y = down(sv.to_spconv())
    mid = SparseVoxels.from_spconv(y)
    feats = mid.feats.detach().clone().requires_grad_(True)
    z = up(y.replace_feature(feats))
    out = SparseVoxels.from_spconv(z)
    assert torch.equal(out.coords, sv.coords)
    # dense reference: transposed conv of the down-sampled grid, read at the original sites
    mid_dense = SparseVoxels(feats, mid.coords, mid.spatial_shape, mid.batch_size).dense()
    w = up.weight.permute(4, 0, 1, 2, 3)  # [Cin_up=C_OUT, Cout_up=C_IN, k, k, k]
    ref_dense = F.conv_transpose3d(mid_dense, w, stride=2, padding=1, output_padding=1)
    ref = gather_sites(ref_dense, out.coords)
    assert (out.feats - ref).abs().max().item() <= 1e-4
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    ga = torch.autograd.grad((out.feats * g).sum(), [feats, up.weight])
    gb = torch.autograd.grad((ref * g).sum(), [feats, up.weight])
    assert (ga[0] - gb[0]).abs().max().item() <= 1e-4
    assert ((ga[1] - gb[1]).abs().max() / gb[1].abs().max()).item() <= 1e-5


@pytest.mark.parametrize("subm", [True, False])
def test_eval_mode_with_bias_matches_dense(subm: bool):
    torch.manual_seed(0)
    sv = random_voxels(6)
    if subm:
        conv = spconv.SubMConv3d(C_IN, C_OUT, 3, bias=True)
        kw = dict(padding=1)
    else:
        conv = spconv.SparseConv3d(C_IN, C_OUT, 3, stride=2, padding=1, bias=True)
        kw = dict(stride=2, padding=1)
    torch.nn.init.uniform_(conv.bias, -1.0, 1.0)
    conv.eval()
    with torch.no_grad():
        out = SparseVoxels.from_spconv(conv(sv.to_spconv()))
        ref = gather_sites(F.conv3d(sv.dense(), dense_weight(conv), conv.bias, **kw), out.coords)
    assert (out.feats - ref).abs().max().item() <= 1e-4


def test_wider_conv_two_threads_and_native_single_thread():
    """16 channels, 6000 voxels, 2 threads: patched == dense; spconv's own kernels with 1 thread too.

    (spconv's kernels with 2 threads are wrong only when both threads really run at once, so that
    failure is load-dependent and not asserted here; the dense comparisons above catch it.)
    """
    torch.manual_seed(0)
    sv = random_voxels(7, n=6000, c=16)
    conv = spconv.SubMConv3d(16, 16, 3, bias=False)
    with torch.no_grad():
        ref = gather_sites(F.conv3d(sv.dense(), dense_weight(conv), padding=1), sv.coords)
        good = conv(sv.to_spconv()).features
        torch.set_num_threads(1)
        with spconv_native_cpu_kernels():
            native = conv(sv.to_spconv()).features
    assert (good - ref).abs().max().item() <= 1e-4
    assert (native - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("subm", [True, False])
def test_bitwise_identical_for_one_and_two_threads(subm: bool):
    """Forward and both gradients do not depend on the thread count, bit for bit."""
    sv = random_voxels(11, n=6000, c=16)
    torch.manual_seed(0)
    conv = (spconv.SubMConv3d(16, 32, 3, bias=False) if subm
            else spconv.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        feats = sv.feats.clone().requires_grad_(True)
        y = conv(SparseVoxels(feats, sv.coords, sv.spatial_shape, sv.batch_size).to_spconv()).features
        g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [feats, conv.weight])
        results.append((y.detach(), *g))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_sparse_voxels_roundtrip_and_dense():
    sv = random_voxels(8, n=50)
    d = sv.dense()
    assert d.shape == (2, C_IN, S, S, S)
    assert torch.equal(gather_sites(d, sv.coords), sv.feats)
    assert d.abs().sum().item() == pytest.approx(sv.feats.abs().sum().item(), rel=1e-5)
    back = SparseVoxels.from_spconv(sv.to_spconv())
    assert torch.equal(back.coords, sv.coords) and back.spatial_shape == (S, S, S)


def test_sparse_voxels_validation():
    f = torch.zeros(3, 2)
    c = torch.zeros(3, 4, dtype=torch.int32)
    with pytest.raises(DataError, match="coords"):
        SparseVoxels(f, c.long(), (4, 4, 4), 1)
    with pytest.raises(DataError, match="coords"):
        SparseVoxels(f, c[:2], (4, 4, 4), 1)
    with pytest.raises(DataError, match="feats"):
        SparseVoxels(f.long(), c, (4, 4, 4), 1)
    with pytest.raises(DataError, match="spatial_shape"):
        SparseVoxels(f, c, (4, 4), 1)
    with pytest.raises(DataError, match="batch_size"):
        SparseVoxels(f, c, (4, 4, 4), 0)
    bad = c.clone()
    bad[1, 3] = 4
    with pytest.raises(DataError, match="row 1"):
        SparseVoxels(f, bad, (4, 4, 4), 1)
    bad = c.clone()
    bad[2, 0] = 1
    with pytest.raises(DataError, match="outside"):
        SparseVoxels(f, bad, (4, 4, 4), 1)
