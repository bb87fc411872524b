"""PSNR, SSIM (+ D-SSIM loss) and LPIPS.

SSIM is checked against scikit-image and against a numpy/scipy implementation of the formula
written here; LPIPS against a step-by-step functional computation from the raw state dicts, with
weights made in the test (the real ones cannot be downloaded here).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from perception3d.errors import DataError
from splatting.metrics import LPIPS, LPIPS_ENV, default_lpips, psnr, ssim, ssim_loss


def _pair(shape=(40, 52, 3), noise=0.1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(*shape, generator=g, dtype=torch.float64)
    ref = torch.from_numpy(gaussian_filter(ref.numpy(), sigma=(1.0,) * (len(shape) - 1) + (0,)))  # some structure
    img = (ref + noise * torch.randn(*shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return img.to(dtype), ref.to(dtype)


# ------------------------------------------------------------------------------------------------
# PSNR
# ------------------------------------------------------------------------------------------------
def test_psnr_hand_computed():
    ref = torch.full((4, 5, 3), 0.5)
    img = ref.clone()
    img[1, 2, 0] = 0.0  # one value off by 0.5: MSE = 0.25 / 60
    assert math.isclose(float(psnr(img, ref)), 10 * math.log10(60 / 0.25), rel_tol=1e-6)  # 23.802 dB
    assert math.isclose(float(psnr(img * 255, ref * 255, max_val=255.0)), 23.80211, rel_tol=1e-5)
    assert psnr(ref, ref).item() == math.inf


def test_psnr_batch_is_mean_of_per_image_values():
    ref = torch.full((2, 4, 4, 3), 0.5)
    img = ref.clone()
    img[0] += 0.1  # MSE 0.01 -> 20 dB
    img[1] -= 0.01  # MSE 1e-4 -> 40 dB
    per = psnr(img, ref, reduction="none")
    torch.testing.assert_close(per, torch.tensor([20.0, 40.0]), rtol=1e-5, atol=1e-4)
    assert math.isclose(float(psnr(img, ref)), 30.0, rel_tol=1e-5)  # not the PSNR of the mean MSE (23.0 dB)


def test_metric_input_errors():
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(DataError, match=r"psnr: img must be channel-last .*\[2, 3, 32, 32\].*channel-first"):
        psnr(x, x)
    with pytest.raises(DataError, match=r"ssim: img and ref shapes differ: \[8, 8, 3\] vs \[8, 9, 3\]"):
        ssim(torch.rand(8, 8, 3), torch.rand(8, 9, 3))
    with pytest.raises(DataError, match=r"ssim: image 8 x 8 is smaller than 11 px"):
        ssim(torch.rand(8, 8, 3), torch.rand(8, 8, 3))
    with pytest.raises(DataError, match="dtype torch.uint8"):
        psnr(torch.zeros(4, 4, 3, dtype=torch.uint8), torch.zeros(4, 4, 3, dtype=torch.uint8))
    with pytest.raises(DataError, match="reduction"):
        psnr(torch.rand(4, 4, 3), torch.rand(4, 4, 3), reduction="sum")


# ------------------------------------------------------------------------------------------------
# SSIM
# ------------------------------------------------------------------------------------------------
def _ssim_map_numpy(x, y, mode, L=1.0):
    """SSIM formula with scipy Gaussian filtering (sigma 1.5, truncated at 3.5 sigma = 11 taps), per channel."""
    f = lambda a: gaussian_filter(a, sigma=(1.5, 1.5, 0), truncate=3.5, mode=mode)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def test_ssim_identical_is_one():
    img, _ = _pair()
    for padding in ("valid", "same"):
        assert abs(float(ssim(img, img, padding=padding)) - 1.0) < 1e-6


def test_ssim_matches_scikit_image_valid():
    skm = pytest.importorskip("skimage.metrics")
    for seed, noise in ((0, 0.05), (1, 0.2)):
        img, ref = _pair(seed=seed, noise=noise)
        want = skm.structural_similarity(img.double().numpy(), ref.double().numpy(), gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1)
        got = float(ssim(img, ref))
        assert abs(got - want) < 2e-6, (got, want)
        assert 0.1 < want < 0.99  # a non-trivial value
        # numpy formula, valid windows only (5 px cropped per side), agrees with both
        num = _ssim_map_numpy(img.double().numpy(), ref.double().numpy(), "reflect")[5:-5, 5:-5].mean()
        assert abs(num - want) < 1e-9


def test_ssim_same_padding_matches_mirror_padded_formula():
    img, ref = _pair(seed=3)
    got = float(ssim(img, ref, padding="same"))
    want = _ssim_map_numpy(img.double().numpy(), ref.double().numpy(), "mirror").mean()  # torch 'reflect'
    assert abs(got - want) < 2e-6
    assert abs(got - float(ssim(img, ref))) > 1e-4  # the border matters: the two paddings differ


def test_ssim_batch_and_float64():
    img, ref = _pair(shape=(3, 24, 30, 3), seed=4)
    per = ssim(img, ref, reduction="none")
    assert per.shape == (3,)
    for b in range(3):
        assert abs(float(per[b]) - float(ssim(img[b], ref[b]))) < 1e-6
    assert abs(float(ssim(img, ref)) - float(per.mean())) < 1e-7
    assert ssim(img.double(), ref.double()).dtype == torch.float64


def test_ssim_loss_gradients():
    img, ref = _pair(shape=(1, 20, 20, 3), seed=5)
    x = img.clone().requires_grad_(True)
    loss = ssim_loss(x, ref)
    assert abs(loss.item() - (1 - float(ssim(img, ref)))) < 1e-6
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = x - 0.5 * x.grad / x.grad.abs().max() * 0.05
    assert float(ssim_loss(stepped, ref)) < loss.item()  # a descent step lowers the loss
    # the separable implementation equals kornia's SSIM, on a batch and at a realistic size
    big, big_ref = _pair(shape=(2, 120, 90, 3), seed=7)
    assert abs(float(ssim_loss(big, big_ref)) - (1 - float(ssim(big, big_ref)))) < 1e-6
    # float64 gradcheck on a tiny image (fast mode: random projections of the Jacobian)
    a, b = _pair(shape=(12, 13, 3), seed=6, dtype=torch.float64)
    a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ssim_loss(t, b), (a,), eps=1e-6, atol=1e-5, fast_mode=True)


# ------------------------------------------------------------------------------------------------
# LPIPS
# ------------------------------------------------------------------------------------------------
_CONV_IDX = (0, 3, 6, 8, 10)
_CONV_CFG = {0: (4, 2), 3: (1, 2), 6: (1, 1), 8: (1, 1), 10: (1, 1)}  # stride, padding
_CHANNELS = (64, 192, 384, 256, 256)


def _manual_lpips(features: dict[str, torch.Tensor], lins: list[torch.Tensor], x, y) -> torch.Tensor:
    """LPIPS step by step from raw weights; x, y are [B, H, W, 3] in [0, 1]. Returns [B]."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h = ((img.permute(0, 3, 1, 2) * 2 - 1) - shift) / scale
        out = []
        for j, i in enumerate(_CONV_IDX):
            if i in (3, 6):
                h = F.max_pool2d(h, 3, 2)
            s, p = _CONV_CFG[i]
            h = F.relu(F.conv2d(h, features[f"features.{i}.weight"], features[f"features.{i}.bias"], stride=s,
                                padding=p))
            out.append(h)
        return out

    total = 0
    for fx, fy, w in zip(taps(x), taps(y), lins):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = (nx - ny).pow(2)
        total = total + (d * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return total


def _fake_official(seed=0):
    g = torch.Generator().manual_seed(seed)
    alex = {}
    cin = 3
    for i, cout in zip(_CONV_IDX, _CHANNELS):
        k = {0: 11, 3: 5}.get(i, 3)
        alex[f"features.{i}.weight"] = torch.randn(cout, cin, k, k, generator=g) * math.sqrt(2 / (cin * k * k))
        alex[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
        cin = cout
    alex["classifier.1.weight"] = torch.randn(16, 9216 // 576, generator=g)  # extra keys, ignored
    alex["classifier.1.bias"] = torch.randn(16, generator=g)
    lins = {f"lin{j}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for j, c in enumerate(_CHANNELS)}
    return alex, lins


def _images(b=2, h=64, w=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g), torch.rand(b, h, w, 3, generator=g)


def test_lpips_from_file_round_trip_and_properties(tmp_path):
    torch.manual_seed(0)
    model = LPIPS()
    x, y = _images()
    path = tmp_path / "w" / "lpips_alex.pth"
    model.save(path)
    loaded = LPIPS.from_file(path)
    assert torch.equal(loaded(x, y, reduction="none"), model(x, y, reduction="none"))
    assert float(loaded(x, x)) == 0.0
    d_xy, d_yx = loaded(x, y, reduction="none"), loaded(y, x, reduction="none")
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-7)
    assert (d_xy > 1e-3).all()
    assert loaded(x[0], y[0]).shape == ()
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    # a closer image is closer
    assert float(loaded(x, (x + 0.02 * (y - 0.5)).clamp(0, 1))) < float(d_xy.mean())


def test_lpips_matches_manual_computation_from_official_files(tmp_path):
    alex, lins = _fake_official(seed=1)
    torch.save(alex, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(lins, tmp_path / "alex.pth")
    model = LPIPS.from_official(tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth")
    x, y = _images(seed=2)
    want = _manual_lpips(alex, [lins[f"lin{j}.model.1.weight"] for j in range(5)], x, y)
    got = model(x, y, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(want.min()) > 0.01
    # saved assembly loads back identically through the single-file path
    model.save(tmp_path / "combined.pth")
    assert torch.equal(LPIPS.from_file(tmp_path / "combined.pth")(x, y, reduction="none"), got)


def test_lpips_gradients_flow_to_images():
    torch.manual_seed(1)
    model = LPIPS()
    x, y = _images(b=1, h=40, w=40, seed=3)
    x.requires_grad_(True)
    model(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_lpips_file_errors(tmp_path):
    torch.manual_seed(2)
    sd = LPIPS().state_dict()
    with pytest.raises(DataError, match=r"nothere\.pth: LPIPS weight file not found"):
        LPIPS.from_file(tmp_path / "nothere.pth")
    bad = {k: v for k, v in sd.items() if k not in ("lins.3.weight", "features.8.bias")}
    torch.save(bad, tmp_path / "partial.pth")
    with pytest.raises(DataError, match=r"partial\.pth: .*missing key\(s\) features\.8\.bias, lins\.3\.weight"):
        LPIPS.from_file(tmp_path / "partial.pth")
    torch.save(dict(sd, extra=torch.zeros(1)), tmp_path / "extra.pth")
    with pytest.raises(DataError, match=r"extra\.pth: .*unexpected key\(s\) extra"):
        LPIPS.from_file(tmp_path / "extra.pth")
    torch.save(dict(sd, **{"lins.0.weight": torch.zeros(1, 32, 1, 1)}), tmp_path / "shape.pth")
    with pytest.raises(DataError, match=r"shape\.pth: LPIPS weight 'lins\.0\.weight' has shape \[1, 32, 1, 1\], "
                                        r"expected \[1, 64, 1, 1\]"):
        LPIPS.from_file(tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"junk\.pth: cannot read LPIPS weight file"):
        LPIPS.from_file(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(DataError, match=r"list\.pth: .*must be a dict of tensors"):
        LPIPS.from_file(tmp_path / "list.pth")
    # official pair: each error names its own file and the missing official keys
    alex, lins = _fake_official()
    torch.save({k: v for k, v in alex.items() if k != "features.6.weight"}, tmp_path / "alexnet.pth")
    torch.save(lins, tmp_path / "alex.pth")
    with pytest.raises(DataError, match=r"alexnet\.pth: .*missing key\(s\) features\.6\.weight"):
        LPIPS.from_official(tmp_path / "alexnet.pth", tmp_path / "alex.pth")
    torch.save(alex, tmp_path / "alexnet.pth")
    torch.save({k: v for k, v in lins.items() if k != "lin2.model.1.weight"}, tmp_path / "alex.pth")
    with pytest.raises(DataError, match=r"alex\.pth: lpips alex\.pth is missing key\(s\) lin2\.model\.1\.weight"):
        LPIPS.from_official(tmp_path / "alexnet.pth", tmp_path / "alex.pth")
    with pytest.raises(DataError, match=r"too small; .*at least 31 x 31"):
        LPIPS()(torch.rand(30, 64, 3), torch.rand(30, 64, 3))


def test_default_lpips_env_and_home(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(LPIPS_ENV, str(tmp_path / "missing.pth"))
    with caplog.at_level(logging.WARNING, logger="splatting.metrics"):
        assert default_lpips() is None
    msgs = [r.getMessage() for r in caplog.records if r.name == "splatting.metrics"]
    assert len(msgs) == 1 and "missing.pth" in msgs[0] and "$P3D_LPIPS_WEIGHTS" in msgs[0]
    torch.manual_seed(3)
    model = LPIPS()
    model.save(tmp_path / "env.pth")
    monkeypatch.setenv(LPIPS_ENV, str(tmp_path / "env.pth"))
    x, y = _images(b=1, seed=5)
    assert torch.equal(default_lpips()(x, y), model(x, y))
    # unset: ~/.cache/perception3d/lpips_alex.pth
    monkeypatch.delenv(LPIPS_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="splatting.metrics"):
        assert default_lpips() is None
    assert "home/.cache/perception3d/lpips_alex.pth" in caplog.text
    model.save(tmp_path / "home" / ".cache" / "perception3d" / "lpips_alex.pth")
    assert torch.equal(default_lpips()(x, y), model(x, y))
