"""Image similarity for reconstructions, batched in torch: MSE, PSNR and SSIM on pixels in [0, 1].

All functions take (N, H, W) or (N, C, H, W) tensors (or one (H, W) image) and return one value
per image, so a whole set of reconstructions is scored in one call.
"""
import torch
import torch.nn.functional as F

# PSNR of identical images would be +inf, which breaks means and strict JSON. MSE is floored at
# 1e-10, so PSNR is capped at 100 dB, far above anything an attack reaches on 8-bit images
# (an error of half a grey level everywhere is already 54 dB).
MSE_FLOOR = 1e-10
PSNR_CAP = 100.0


def _as_batch(x):
    x = torch.as_tensor(x).float()
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(f'expected images of shape (H, W), (N, H, W) or (N, C, H, W), got {tuple(x.shape)}')
    return x


def mse(a, b):
    a, b = _as_batch(a), _as_batch(b)
    return (a - b).pow(2).flatten(1).mean(1)


def psnr(a, b, data_range=1.0):
    """10 log10(range^2 / MSE) per image, capped at PSNR_CAP dB for identical images."""
    return 10 * torch.log10(data_range ** 2 / mse(a, b).clamp_min(MSE_FLOOR * data_range ** 2))


def _gaussian_window(size=11, sigma=1.5, device=None):
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a, b, data_range=1.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Mean SSIM per image (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03.

    Local statistics use the window's weighted (population) moments and only positions where the
    window fits inside the image ('valid', as in the authors' ssim_index.m); channels are averaged.
    """
    a, b = _as_batch(a), _as_batch(b)
    if a.shape != b.shape:
        raise ValueError(f'ssim: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}')
    n, c, h, w = a.shape
    if h < size or w < size:
        raise ValueError(f'ssim: images {h}x{w} are smaller than the {size}x{size} window')
    window = _gaussian_window(size, sigma, a.device).expand(c, 1, size, size)
    filt = lambda x: F.conv2d(x, window, groups=c)  # noqa: E731
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)
