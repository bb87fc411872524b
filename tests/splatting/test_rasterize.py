"""The rasterizer: projection and SH vs gsplat's pure-torch functions, CPU kernel vs the pure-torch
reference (values and gradients), float64 gradcheck, a hand-computed pixel, culling, errors."""
import math

import pytest
import torch

from perception3d.errors import DataError
from splatting._ext import cpu_ext
from splatting._reference import bin_gaussians_torch
from splatting.projection import maybe_visible, project_gaussians
from splatting.rasterize import rasterize
from splatting.sh import eval_sh, rgb_to_sh0

gsplat_torch = pytest.importorskip("gsplat.cuda._torch_impl")


def _scene(n=400, C=2, W=70, H=50, dtype=torch.float32, seed=0, sh_degree=None):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * torch.tensor([1.6, 1.1, 1.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.15 + 0.02
    opac = torch.rand(n, generator=g) * 0.9 + 0.05
    if sh_degree is None:
        colors = torch.rand(n, 3, generator=g)
    else:
        colors = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    viewmats = torch.eye(4).repeat(C, 1, 1)
    viewmats[:, 2, 3] = 4.0
    if C > 1:  # a second camera, turned by 10 degrees about y and shifted
        a = math.radians(10)
        viewmats[1, :3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        viewmats[1, 0, 3] = 0.3
    Ks = torch.tensor([[60.0, 0, W / 2 + 0.3], [0, 58.0, H / 2 - 0.2], [0, 0, 1]]).repeat(C, 1, 1)
    tensors = [t.to(dtype) for t in (means, quats, scales, opac, colors, viewmats, Ks)]
    return tensors, W, H


@pytest.mark.parametrize("antialiased", [False, True])
def test_projection_matches_gsplat_torch(antialiased):
    (means, quats, scales, _, _, viewmats, Ks), W, H = _scene(dtype=torch.float64)
    means = means * torch.tensor([3.0, 3.0, 4.5], dtype=torch.float64)  # some behind the camera / outside
    p = project_gaussians(means, quats, scales, viewmats, Ks, W, H, antialiased=antialiased)
    covars, _ = gsplat_torch._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, comp = gsplat_torch._fully_fused_projection(
        means, covars, viewmats, Ks, W, H, calc_compensations=antialiased)
    assert 0 < int((p.radii > 0).sum()) < p.radii.numel()  # both culled and visible ones
    assert torch.equal(p.radii, radii)
    vis = radii > 0
    torch.testing.assert_close(p.means2d[vis], means2d[vis], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(p.conics[vis], conics[vis], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(p.depths, depths)
    if antialiased:
        torch.testing.assert_close(p.compensations[vis], comp[vis], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_gsplat_torch(degree):
    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(50, 3, generator=g, dtype=torch.float64)
    coeffs = torch.randn(50, 16, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(eval_sh(degree, dirs, coeffs), gsplat_torch._spherical_harmonics(degree, dirs, coeffs))
    # the DC term alone renders its colour from every direction
    rgb = torch.rand(50, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(eval_sh(0, dirs, rgb_to_sh0(rgb)[:, None]) + 0.5, rgb)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_kernel_matches_eval_sh(degree):
    """The C++ SH kernel (gather + colour, analytic backward) against eval_sh's autograd, float64,
    two cameras seeing overlapping Gaussians and 16 coefficients whatever the degree."""
    from splatting.rasterize import _SHColorsCPU
    g = torch.Generator().manual_seed(10 + degree)
    coeffs = torch.randn(50, 16, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    gid = torch.cat([torch.randperm(50, generator=g)[:30].sort().values, torch.randperm(50, generator=g)[:20].sort().values])
    dirs = (torch.randn(50, 3, dtype=torch.float64, generator=g) * 3).requires_grad_(True)
    w = torch.randn(50, 3, dtype=torch.float64, generator=g)
    ours = _SHColorsCPU.apply(dirs, coeffs, gid, torch.tensor([30, 20]), degree)
    v_dirs, v_coeffs = torch.autograd.grad((ours * w).sum(), [dirs, coeffs])
    ref = eval_sh(degree, dirs, coeffs[gid])
    r_dirs, r_coeffs = torch.autograd.grad((ref * w).sum(), [dirs, coeffs], allow_unused=True)
    r_dirs = torch.zeros_like(dirs) if r_dirs is None else r_dirs  # degree 0 does not depend on the direction
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(v_coeffs, r_coeffs, rtol=0, atol=1e-12)
    torch.testing.assert_close(v_dirs, r_dirs, rtol=0, atol=1e-12)
    assert degree == 0 or r_dirs.abs().max() > 0.1


@pytest.mark.parametrize("antialiased", [False, True])
def test_projection_kernel_matches_project_gaussians(antialiased):
    """The C++ projection (candidates gathered, outputs scattered to [C, N]) against
    project_gaussians' autograd, float64: values and the gradients of means, quats and scales.
    Some Gaussians are clamped at the field-of-view bound and some are not candidates."""
    from splatting.rasterize import _ProjectCPU
    (means, quats, scales, _, _, viewmats, Ks), W, H = _scene(n=300, C=2, dtype=torch.float64, seed=6)
    means = means * torch.tensor([4.0, 4.0, 1.0], dtype=torch.float64)  # some beyond 1.3x the field of view
    quats = quats * 3.0  # not unit length
    ids = torch.randperm(300, generator=torch.Generator().manual_seed(7))[:240].sort().values
    params = [t.clone().requires_grad_(True) for t in (means, quats, scales)]
    ours = _ProjectCPU.apply(*params, viewmats, Ks, ids, W, H, 0.3, 0.01, 1e10, 0.0, antialiased)
    sub = [t[ids] for t in params]
    ref = project_gaussians(*sub, viewmats, Ks, W, H, antialiased=antialiased)
    g = torch.Generator().manual_seed(8)
    ws = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in (ref.means2d, ref.conics, ref.depths)]
    ws.append(torch.randn(2, 240, dtype=torch.float64, generator=g))
    ref_out = [ref.means2d, ref.conics, ref.depths] + ([ref.compensations] if antialiased else [])
    our_out = [t[:, ids] for t in (ours[0], ours[1], ours[2])] + ([ours[4][:, ids]] if antialiased else [])
    for a, b in zip(our_out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(ours[3][:, ids], ref.radii) and not ours[3][:, ids].eq(0).all()
    outside = torch.ones(300, dtype=torch.bool)
    outside[ids] = False
    assert all(t[:, outside].abs().max() == 0 for t in ours if t is not None)
    # x/z beyond the clamp for some entries: the clamp's zero gradient is exercised
    x_over_z = (means[ids] @ viewmats[:, :3, :3].transpose(1, 2) + viewmats[:, None, :3, 3])
    assert (x_over_z[..., 0] / x_over_z[..., 2]).abs().max() > 1.3 * 0.5 * W / 60.0
    loss_o = sum((a * w).sum() for a, w in zip(our_out, ws))
    loss_r = sum((a * w).sum() for a, w in zip(ref_out, ws))
    g_ours = torch.autograd.grad(loss_o, params)
    g_ref = torch.autograd.grad(loss_r, params)
    for name, a, b in zip(["means", "quats", "scales"], g_ours, g_ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()), msg=name)
        assert a[outside].abs().max() == 0, name


def test_binning_cpp_is_gsplat_binning_minus_empty_tiles():
    (means, quats, scales, opacities, _, viewmats, Ks), W, H = _scene(n=600, C=2)
    p = project_gaussians(means, quats, scales, viewmats, Ks, W, H)
    tw, th = math.ceil(W / 16), math.ceil(H / 16)
    opac = opacities[None].expand(2, -1)
    off_c, ids_c, _ = cpu_ext().bin_gaussians(p.means2d, p.conics, opac, p.radii, p.depths, 16, tw, th)
    off_t, ids_t = bin_gaussians_torch(p.means2d, p.radii, p.depths, 16, tw, th)
    assert 600 < ids_c.numel() < ids_t.numel()
    depth = p.depths.reshape(-1)
    m2, cn, op = p.means2d.reshape(-1, 2), p.conics.reshape(-1, 3), opac.reshape(-1)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    for t in range(2 * th * tw):
        seg_c, seg_t = ids_c[off_c[t]:off_c[t + 1]], ids_t[off_t[t]:off_t[t + 1]]
        # each list is sorted by depth, holds only Gaussians of its camera, and is a sub-list of gsplat's
        assert bool((depth[seg_c][1:] >= depth[seg_c][:-1]).all())
        assert bool((seg_c // 600 == t // (th * tw)).all())
        assert torch.equal(seg_t[torch.isin(seg_t, seg_c)], seg_c)
        # the Gaussians it drops reach alpha < 1/255 at every pixel of the tile
        dropped = seg_t[~torch.isin(seg_t, seg_c)]
        ty, tx = (t % (th * tw)) // tw, t % tw
        dx = m2[dropped, 0, None, None] - (tx * 16 + xs + 0.5)
        dy = m2[dropped, 1, None, None] - (ty * 16 + ys + 0.5)
        a, b, c = (cn[dropped, k, None, None] for k in range(3))
        alpha = op[dropped, None, None] * torch.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy))
        assert dropped.numel() == 0 or float(alpha.max()) < 1 / 255


def _render(args, W, H, backend, sh_degree=None, **kw):
    a = [t.clone().requires_grad_(i < 5) for i, t in enumerate(args)]
    bg = torch.tensor([[0.2, 0.5, 0.1], [0.9, 0.0, 0.3]], dtype=a[0].dtype, device=a[0].device)
    bg = bg[: args[5].shape[0]].requires_grad_(True)
    rgb, alpha, depth, meta = rasterize(*a, W, H, sh_degree=sh_degree, backgrounds=bg, backend=backend, **kw)
    # a realistic loss: means over pixels, as in training
    w = torch.linspace(0.5, 1.5, 3, dtype=rgb.dtype, device=rgb.device)
    loss = (rgb * w).mean() + alpha.square().mean() + (0.0 if depth is None else 0.1 * depth.mean())
    loss.backward()
    grads = [x.grad for x in a[:5]] + [bg.grad]
    return rgb.detach(), alpha.detach(), None if depth is None else depth.detach(), grads


@pytest.mark.parametrize("mode,rmode,sh,tile",  # tiles of 4-px strips (16, 8) and of one strip (6)
                         [("RGB+ED", "classic", None, 16), ("RGB+D", "antialiased", 3, 16), ("RGB", "classic", 1, 16),
                          ("RGB+D", "classic", None, 8), ("RGB", "classic", 2, 6)])
def test_cpu_kernel_matches_reference(mode, rmode, sh, tile):
    args, W, H = _scene(sh_degree=sh)
    ours = _render(args, W, H, "cpu", sh, render_mode=mode, rasterize_mode=rmode, tile_size=tile)
    ref = _render(args, W, H, "reference", sh, render_mode=mode, rasterize_mode=rmode, tile_size=tile)
    assert ref[1].max() > 0.9 and ref[1].min() < 0.1  # covered and empty pixels both present
    for a, b in zip(ours[:3], ref[:3]):
        if b is not None:
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    names = ["means", "quats", "scales", "opacities", "colors", "backgrounds"]
    for name, ga, gb in zip(names, ours[3], ref[3]):
        assert gb.abs().max() > 0, name
        assert (ga - gb).abs().max().item() <= 1e-5, (name, (ga - gb).abs().max().item(), gb.abs().max().item())


def test_gradcheck_float64_tiny_scene():
    args, W, H = _scene(n=12, C=1, W=20, H=18, dtype=torch.float64, seed=3)
    means, quats, scales, opac, colors, viewmats, Ks = args
    scales = scales * 3

    def f(m, q, s, o, c):
        rgb, alpha, depth, _ = rasterize(m, q, s, o, c, viewmats, Ks, W, H, render_mode="RGB+ED", backend="cpu")
        return rgb, alpha, depth

    inputs = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_single_gaussian_known_pixel():
    # An isotropic Gaussian (std s) at depth z on the optical axis: cov2d = (f s / z)^2 + 0.3 px^2,
    # so at a pixel centre d pixels away (per axis) alpha = o exp(-0.5 |d|^2 / var).
    f, s, z, o, W, H = 50.0, 0.1, 5.0, 0.7, 16, 16
    K = torch.tensor([[[f, 0, 8.0], [0, f, 8.0], [0, 0, 1]]])
    rgb, alpha, depth, meta = rasterize(torch.tensor([[0.0, 0, z]]), torch.tensor([[1.0, 0, 0, 0]]),
                                        torch.full((1, 3), s), torch.tensor([o]), torch.tensor([[1.0, 0.5, 0.25]]),
                                        torch.eye(4)[None], K, W, H, render_mode="RGB+D")
    var = (f * s / z) ** 2 + 0.3
    for (u, v) in [(8, 8), (7, 8), (10, 5)]:
        d2 = (u + 0.5 - 8.0) ** 2 + (v + 0.5 - 8.0) ** 2
        a = o * math.exp(-0.5 * d2 / var)
        assert alpha[0, v, u, 0].item() == pytest.approx(a if a >= 1 / 255 else 0.0, rel=1e-5, abs=1e-7)
        assert rgb[0, v, u].tolist() == pytest.approx([a * 1.0, a * 0.5, a * 0.25], rel=1e-5, abs=1e-7)
        assert depth[0, v, u, 0].item() == pytest.approx(a * z, rel=1e-5, abs=1e-6)
    assert meta["radii"].item() == math.ceil(3 * math.sqrt(var + math.sqrt(0.01)))


def _two_on_axis(s):
    """Red Gaussian at z = 3 in front of a blue one at z = 6 (listed first), both opacity 1."""
    f = 20.0
    out = rasterize(torch.tensor([[0.0, 0, 6.0], [0.0, 0, 3.0]]), torch.tensor([[1.0, 0, 0, 0]] * 2),
                    torch.full((2, 3), s), torch.tensor([1.0, 1.0]), torch.tensor([[0.0, 0, 1], [1.0, 0, 0]]),
                    torch.eye(4)[None], torch.tensor([[[f, 0, 8], [0, f, 8], [0, 0, 1]]]), 16, 16)
    # alpha at the centre pixel (0.5 px off the mean along x and y) of a Gaussian at depth z
    alpha = [min(0.999, math.exp(-0.25 / ((f * s / z) ** 2 + 0.3))) for z in (3.0, 6.0)]
    return out, alpha


def test_front_to_back_compositing():
    (rgb, alpha, _, _), (a_front, a_back) = _two_on_axis(1.0)
    assert rgb[0, 8, 8].tolist() == pytest.approx([a_front, 0.0, a_back * (1 - a_front)], rel=1e-5)
    assert alpha[0, 8, 8, 0].item() == pytest.approx(1 - (1 - a_front) * (1 - a_back), rel=1e-6)


def test_saturation_stops_compositing():
    # Very wide Gaussians: alpha clamps at 0.999; the back one would bring the transmittance from
    # 1e-3 to 1e-6 <= 1e-4, so it is not composited at all (gsplat's stopping rule).
    (rgb, alpha, _, _), (a_front, a_back) = _two_on_axis(30.0)
    assert a_front == a_back == 0.999
    assert rgb[0].reshape(-1, 3)[:, 2].abs().max().item() == 0.0
    assert rgb[0, 8, 8, 0].item() == pytest.approx(0.999, rel=1e-6)
    assert alpha[0, 8, 8, 0].item() == pytest.approx(0.999, rel=1e-6)


def test_culled_and_means2d_gradients():
    (means, quats, scales, opac, colors, viewmats, Ks), W, H = _scene(n=50, C=1)
    means = means.clone()
    means[0] = torch.tensor([0.0, 0.0, -6.0])  # behind the camera
    means = means.requires_grad_(True)
    rgb, _, _, meta = rasterize(means, quats, scales, opac, colors, viewmats, Ks, W, H)
    meta["means2d"].retain_grad()
    rgb.mean().backward()
    g2 = meta["means2d"].grad
    assert g2.shape == (1, 50, 2) and meta["radii"][0, 0] == 0
    assert g2[0, 0].abs().sum() == 0 and means.grad[0].abs().sum() == 0
    assert bool((g2[0, meta["radii"][0] > 0].abs().sum(-1) > 0).any())
    assert meta["width"] == W and meta["height"] == H and meta["n_cameras"] == 1


def test_bad_inputs():
    (means, quats, scales, opac, colors, viewmats, Ks), W, H = _scene(n=10, C=1)
    with pytest.raises(DataError, match="quats"):
        rasterize(means, quats[:5], scales, opac, colors, viewmats, Ks, W, H)
    with pytest.raises(DataError, match="SH coefficients"):
        rasterize(means, quats, scales, opac, colors, viewmats, Ks, W, H, sh_degree=1)
    with pytest.raises(DataError, match="NaN"):
        rasterize(means.clone().fill_(float("nan")), quats, scales, opac, colors, viewmats, Ks, W, H)
    with pytest.raises(DataError, match="render_mode"):
        rasterize(means, quats, scales, opac, colors, viewmats, Ks, W, H, render_mode="D")
    with pytest.raises(DataError, match="width"):
        rasterize(means, quats, scales, opac, colors, viewmats, Ks, 0, H)
    with pytest.raises(DataError, match="Ks: expected a tensor on cpu"):
        rasterize(means, quats, scales, opac, colors, viewmats, Ks.to("meta"), W, H)


@pytest.mark.cuda
def test_gsplat_cuda_parity():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    args, W, H = _scene(n=2000, C=2, W=160, H=120, sh_degree=3)
    cpu = _render(args, W, H, "cpu", 3, render_mode="RGB+ED")
    gpu = _render([t.cuda() for t in args], W, H, "gsplat", 3, render_mode="RGB+ED")
    for a, b in zip(cpu[:3], gpu[:3]):
        assert (a - b.cpu()).abs().max().item() < 1e-4
    for a, b in zip(cpu[3], gpu[3]):
        assert (a - b.cpu()).abs().max().item() < 1e-4 * max(1.0, a.abs().max().item())


def test_culling_before_projection_is_conservative():
    # a wide cloud: many Gaussians behind the cameras or off-image, some huge, some at the border
    (means, quats, scales, opacities, colors, viewmats, Ks), W, H = _scene(n=3000, C=2, seed=3)
    g = torch.Generator().manual_seed(4)
    means = (torch.rand(3000, 3, generator=g) * 2 - 1) * torch.tensor([12.0, 9.0, 8.0])
    scales = torch.exp(torch.randn(3000, 3, generator=g) * 1.5 - 2.5)
    full = project_gaussians(means, quats, scales, viewmats, Ks, W, H)
    keep = maybe_visible(means, scales, viewmats, Ks, W, H)
    visible = (full.radii > 0).any(0)
    assert bool((keep | ~visible).all())  # nothing visible is culled
    assert 0.1 < float(keep.float().mean()) < 0.8  # and the test really culls
    _, _, _, meta = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, W, H, backend="cpu")
    # the CPU backend's projection kernel on every Gaussian gives exactly what it gave on the candidates
    from splatting.rasterize import _ProjectCPU
    every = _ProjectCPU.apply(means, quats, scales, viewmats, Ks, torch.arange(3000), W, H, 0.3, 0.01, 1e10, 0.0, False)
    assert torch.equal(meta["radii"], every[3]) and torch.equal(every[3] > 0, full.radii > 0)
    vis = every[3] > 0
    assert torch.equal(meta["means2d"][vis], every[0][vis]) and torch.equal(meta["conics"][vis], every[1][vis])
    # in float32 as accurate as the torch projection: near-singular 2D covariances (edge-on
    # Gaussians) lose digits in the determinant in both, measured against float64
    exact = project_gaussians(*(t.double() for t in (means, quats, scales, viewmats, Ks)), W, H).conics[vis]
    scale = exact.abs().amax(-1, keepdim=True)
    err_kernel = ((meta["conics"][vis].double() - exact).abs() / scale).max()
    err_torch = ((full.conics[vis].double() - exact).abs() / scale).max()
    assert err_kernel <= 1.5 * err_torch


def test_cpu_kernel_is_deterministic():
    args, W, H = _scene(n=2000, C=2, W=150, H=110, seed=5)
    torch.set_num_threads(2)
    first = _render(args, W, H, "cpu")
    again = _render(args, W, H, "cpu")
    for a, b in zip(first[:2] + tuple(first[3]), again[:2] + tuple(again[3])):
        assert torch.equal(a, b)  # same thread count: bitwise the same, gradients included
    torch.set_num_threads(1)
    try:
        one = _render(args, W, H, "cpu")
    finally:
        torch.set_num_threads(2)
    # another thread count: the same up to float rounding (torch's GEMMs and the gradient sums
    # are blocked differently)
    for a, b in zip(one[:2] + tuple(one[3]), first[:2] + tuple(first[3])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
