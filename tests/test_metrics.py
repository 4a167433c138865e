import math

import pytest
import torch

from src.metrics import PSNR_CAP, mse, psnr, ssim


def test_mse_and_psnr_on_hand_cases():
    a = torch.zeros(2, 1, 28, 28)
    b = a.clone()
    b[0] += 0.1          # MSE 0.01 -> 20 dB
    b[1, 0, :14] = 1.0   # half the pixels off by 1 -> MSE 0.5 -> 3.01 dB
    torch.testing.assert_close(mse(a, b), torch.tensor([0.01, 0.5]))
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 10 * math.log10(2)]), atol=1e-4, rtol=0)


def test_psnr_is_exact_for_known_mse():
    a = torch.zeros(4, 28, 28)
    b = a + torch.tensor([1.0, 0.1, 0.01, 0.001]).view(4, 1, 1)  # MSE 1, 1e-2, 1e-4, 1e-6
    torch.testing.assert_close(mse(a, b), torch.tensor([1.0, 1e-2, 1e-4, 1e-6]), rtol=1e-5, atol=0)
    torch.testing.assert_close(psnr(a, b), torch.tensor([0.0, 20.0, 40.0, 60.0]), rtol=0, atol=1e-3)
    torch.testing.assert_close(psnr(b, a), psnr(a, b))  # symmetric
    # one (H, W) image, and (N, C, H, W) batches averaging over channels too
    assert psnr(a[1], b[1]).shape == (1,) and abs(psnr(a[1], b[1]).item() - 20.0) < 1e-3
    c = torch.zeros(1, 2, 28, 28)
    c[0, 1] = 0.2  # MSE (0 + 0.04) / 2 = 0.02
    torch.testing.assert_close(mse(torch.zeros_like(c), c), torch.tensor([0.02]))
    # data_range rescales: the same images on a 0..255 scale have the same PSNR
    torch.testing.assert_close(psnr(255 * a, 255 * b, data_range=255.0), psnr(a, b), rtol=0, atol=1e-3)


def test_psnr_of_identical_images_is_capped_not_inf():
    x = torch.rand(3, 28, 28)
    assert torch.all(psnr(x, x) == PSNR_CAP)
    y = x.clone()
    y[0, 0, 0] += 1e-2  # MSE 1e-4 / 784: about 78.9 dB, under the cap and not clipped to it
    got = psnr(x, y)
    assert abs(got[0].item() - 10 * math.log10(784 / 1e-4)) < 0.01 and torch.all(got[1:] == PSNR_CAP)
    assert torch.all(torch.isfinite(psnr(x, x)))


def test_ssim_identical_is_one_and_degrades():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    s = ssim(x, noisy)
    assert torch.all(s < 0.9) and torch.all(s > 0)
    torch.testing.assert_close(ssim(noisy, x), s)  # symmetric
    less = ssim(x, (x + 0.05 * torch.randn_like(x)).clamp(0, 1))
    assert torch.all(less > s) and torch.all(less < 1)  # less noise, more similar
    # an image against its negative: same means, structure reversed -> close to -1
    neg = ssim(x, 1 - x)
    assert torch.all(neg < -0.9)


def test_ssim_of_flat_images_is_the_luminance_term():
    """Constant images have no variance, so SSIM is exactly (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)."""
    a, b = torch.full((1, 20, 20), 0.3), torch.full((1, 20, 20), 0.5)
    c1 = 0.01 ** 2
    expected = (2 * 0.3 * 0.5 + c1) / (0.3 ** 2 + 0.5 ** 2 + c1)
    assert abs(ssim(a, b).item() - expected) < 1e-4
    assert abs(ssim(a, a).item() - 1) < 1e-5
    # data_range scales the constants: the same pair on a 0..255 scale gives the same SSIM
    assert abs(ssim(255 * a, 255 * b, data_range=255.0).item() - expected) < 1e-4


def test_ssim_is_per_image_and_averages_channels():
    torch.manual_seed(2)
    x, y = torch.rand(3, 2, 16, 16), torch.rand(3, 2, 16, 16)
    whole = ssim(x, y)
    assert whole.shape == (3,)
    per_channel = torch.stack([ssim(x[:, ch], y[:, ch]) for ch in range(2)]).mean(0)
    torch.testing.assert_close(whole, per_channel, rtol=0, atol=1e-6)
    for i in range(3):  # each image scored on its own, whatever else is in the batch
        torch.testing.assert_close(ssim(x[i:i + 1], y[i:i + 1]), whole[i:i + 1], rtol=0, atol=1e-6)


def test_ssim_matches_a_direct_computation():
    # one 11x11 image: the valid SSIM map is a single Gaussian-weighted statistic
    torch.manual_seed(1)
    a, b = torch.rand(11, 11), torch.rand(11, 11)
    g = torch.exp(-(torch.arange(11.) - 5) ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    ma, mb = (w * a).sum(), (w * b).sum()
    va, vb, cov = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    torch.testing.assert_close(ssim(a, b)[0], expected, atol=1e-5, rtol=0)


def test_ssim_averages_every_valid_window():
    """A 13x12 image has 3x2 window positions ('valid', no padding): SSIM is the mean of the six."""
    torch.manual_seed(3)
    a, b = torch.rand(13, 12), torch.rand(13, 12)
    b = 0.5 * a + 0.5 * b  # correlated, so the value is far from 0
    g = torch.exp(-(torch.arange(11.) - 5) ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(3):
        for j in range(2):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    values = torch.stack(values)
    assert values.std() > 0.01  # the windows differ, so a single one (or a padded map) would not match
    torch.testing.assert_close(ssim(a, b)[0], values.mean(), atol=1e-5, rtol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        ssim(torch.rand(2, 28, 28), torch.rand(3, 28, 28))
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 8, 8), torch.rand(1, 8, 8))
    with pytest.raises(ValueError):
        mse(torch.rand(1, 1, 1, 8, 8), torch.rand(1, 1, 1, 8, 8))
    assert ssim(torch.rand(1, 11, 11), torch.rand(1, 11, 11)).shape == (1,)  # the window just fits
