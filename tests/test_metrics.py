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


def test_psnr_of_identical_images_is_capped_not_inf():
    x = torch.rand(3, 28, 28)
    assert torch.all(psnr(x, x) == PSNR_CAP)


def test_ssim_identical_is_one_and_degrades():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    s = ssim(x, noisy)
    assert torch.all(s < 0.9) and torch.all(s > 0)
    torch.testing.assert_close(ssim(noisy, x), s)  # symmetric


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


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        ssim(torch.rand(2, 28, 28), torch.rand(3, 28, 28))
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 8, 8), torch.rand(1, 8, 8))
