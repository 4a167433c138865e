"""GMI's generative prior: a small DCGAN the server trains on data it legitimately holds, and its cache.

Used by src/attacks/gan_inversion.py. The discriminator has no batch norm, so D(G(z)) of one latent never
depends on the others in a batch: the latent search can optimise every class and restart as one batch.
"""
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from src.data import image_shape, to_tensor
from src.utils import (UserError, autocast, capture_cuda_graph, derive_seed, load_cached, resolve_precision, save_torch,
                       state_digest)

Z_DIM = 100
ARCH = 'dcgan28-v2'  # part of the cache key: change it when the networks change


class Generator(nn.Module):
    """z (100) -> FC 128x7x7 -> up 64x14x14 -> up 1x28x28, sigmoid: pixels in [0, 1] like the target's input.
    For other images (C, H, W): FC 128 x ceil(H/4) x ceil(W/4), two up-samplings, cropped to H x W."""

    def __init__(self, z_dim=Z_DIM, shape=(1, 28, 28)):
        super().__init__()
        c, self.h, self.w = shape
        h4, w4 = -(-self.h // 4), -(-self.w // 4)
        self.net = nn.Sequential(
            nn.Linear(z_dim, 128 * h4 * w4, bias=False), nn.BatchNorm1d(128 * h4 * w4), nn.ReLU(),
            nn.Unflatten(1, (128, h4, w4)),
            nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, c, 4, 2, 1), nn.Sigmoid())

    def forward(self, z):
        return self.net(z)[..., :self.h, :self.w]


class Discriminator(nn.Module):
    """28x28 -> conv 64 (14x14) -> conv 128 (7x7) -> one logit: "real" is high. No batch norm, so
    D(G(z)) of one latent never depends on the others in the batch (the inversion prior is per image)."""

    def __init__(self, shape=(1, 28, 28)):
        super().__init__()
        c, h, w = shape
        self.net = nn.Sequential(
            nn.Conv2d(c, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(128 * (h // 2 // 2) * (w // 2 // 2), 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


def train_gan(images, seed, steps, batch_size=64, lr=2e-4, precision='fp32', device='cpu', progress=True,
              log_every=100, graph=None):
    """DCGAN (non-saturating loss, Adam(0.5, 0.999)) on uint8 images (N, H, W) or (N, C, H, W) for `steps` batches,
    reshuffling every pass. A step budget (not epochs) keeps training time the same for any public-set size.

    Returns (G, D, history): mean losses and D accuracies over each `log_every` steps. channels_last + bf16
    autocast train ~2x faster than fp32 on AMX CPUs (benchmarks/bench_gan_inversion.py measures it). On CUDA
    (graph=None means there) the whole step -- both forward passes, both backward passes, both Adam steps --
    is captured once in a CUDA graph and replayed: a step of batch 64 is a few microseconds of arithmetic per
    kernel, so an eager GPU step mostly waits for launches. The batches and latents are drawn on the CPU in
    the same order either way, so both paths train on the same data.
    """
    device = torch.device(device)
    graph = device.type == 'cuda' if graph is None else graph
    torch.manual_seed(derive_seed(seed, 'gmi', 'init'))
    shape = image_shape(images)
    G = Generator(shape=shape).to(device, memory_format=torch.channels_last).train()
    D = Discriminator(shape).to(device, memory_format=torch.channels_last).train()
    capturable = device.type == 'cuda'  # Adam's step count on the device: no host sync, and capturable
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999), capturable=capturable)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999), capturable=capturable)
    x = to_tensor(images, device).contiguous(memory_format=torch.channels_last)
    n = len(x)
    if n < 2:
        raise UserError(f'the GAN public data has {n} images: need at least 2')
    batch_size = min(batch_size, n)
    index = torch.zeros(batch_size, dtype=torch.long, device=device)  # the step's inputs: fixed buffers,
    z = torch.zeros(batch_size, Z_DIM, device=device)                  # as a CUDA graph's replay reads them
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # summed on the device: no sync per step

    def step():
        real = x[index]
        with autocast(device, precision, cache_enabled=False):  # autocast's cache and CUDA graphs do not mix
            fake = G(z)
            # real and fake in one pass: D has no batch norm, so this is exactly the two separate passes
            d_real, d_fake = D(torch.cat([real, fake.detach()])).float().split(batch_size)
            # softplus(-x) = -log sigmoid(x): the GAN's binary cross-entropy on logits
            d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        D.requires_grad_(False)  # the generator's step needs gradients through D, not for its weights
        with autocast(device, precision, cache_enabled=False):
            g_loss = F.softplus(-D(fake).float()).mean()  # non-saturating generator loss
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        D.requires_grad_(True)
        sums.add_(torch.stack([d_loss.detach(), g_loss.detach(), (d_real > 0).float().mean(),
                               (d_fake < 0).float().mean()]).double())

    run = capture_gan_step(step, [G, D], [opt_g, opt_d], sums) if graph and steps > 0 else step
    gen = torch.Generator().manual_seed(derive_seed(seed, 'gmi', 'data'))
    history = {'step': [], 'd_loss': [], 'g_loss': [], 'd_real_accuracy': [], 'd_fake_accuracy': []}
    count, order, pos = 0, None, n
    for s in tqdm(range(1, steps + 1), desc='training GAN prior', unit='step', disable=not progress, leave=False):
        if pos + batch_size > n:  # new pass; drop the ragged tail (batch norm wants full batches)
            order, pos = torch.randperm(n, generator=gen).to(device), 0
        index.copy_(order[pos:pos + batch_size])
        pos += batch_size
        z.copy_(torch.randn(batch_size, Z_DIM, generator=gen), non_blocking=True)
        run()
        count += 1
        if s % log_every == 0 or s == steps:
            history['step'].append(s)
            for key, value in zip(list(history)[1:], (sums / count).tolist()):
                history[key].append(value)
            sums.zero_()
            count = 0
    return G.eval(), D.eval(), history


def capture_gan_step(step, modules, optimizers, sums):
    """`step` captured in a CUDA graph. Capturing needs warm-up steps first (they pick the kernels and create
    Adam's state); they are undone in place -- the graph keeps these tensors' addresses -- so training starts
    from the same weights, batch-norm statistics and empty Adam state (zeros) as the eager path."""
    saved = [t.clone() for m in modules for t in m.state_dict().values()]
    graph = capture_cuda_graph(step)
    restart(modules, optimizers, saved)
    sums.zero_()
    return graph.replay


@torch.no_grad()
def restart(modules, optimizers, saved):
    """Undo training in place: the modules' weights and buffers back to `saved` (their state_dict values, in
    order), Adam's state to zeros, which is what its first step starts from."""
    for t, old in zip([t for m in modules for t in m.state_dict().values()], saved):
        t.copy_(old)
    for opt in optimizers:
        for state in opt.state.values():
            for v in state.values():
                v.zero_()


def gan_cache_key(images, seed, steps, batch_size, lr, precision):
    key = {'arch': ARCH, 'z_dim': Z_DIM, 'image_shape': list(image_shape(images)),
           'public_sha256': hashlib.sha256(np.ascontiguousarray(images)).hexdigest(),
           'num_public': int(len(images)), 'seed': int(seed), 'steps': int(steps), 'batch_size': int(batch_size),
           'lr': float(lr), 'precision': precision}
    return key, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _check_state(state, module, what):
    """Refuse anything but exactly `module`'s tensors (names, shapes, dtypes): weights_only loading admits
    strings, numbers and lists too, and load_state_dict would cast or broadcast some of them silently."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f'its {what} weights are not a state dict of tensors')
    expected = module.state_dict()
    if set(state) != set(expected) or any(state[k].shape != v.shape or state[k].dtype != v.dtype
                                          for k, v in expected.items()):
        raise UserError(f'its {what} weights do not fit the {ARCH} networks')


def _check_info(saved):
    """What the attack reads besides the weights: a finite training time, a loss history, a precision."""
    seconds, history = saved['train_seconds'], saved['history']
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise UserError('its training time is not a number of seconds')
    if (not isinstance(history, dict) or not all(isinstance(history.get(k), list) for k in ('step', 'd_loss', 'g_loss'))
            or not history['d_loss'] or not history['g_loss']
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for k in ('d_loss', 'g_loss') for v in history[k])):
        raise UserError('its training history is malformed')
    if saved['precision'] not in ('fp32', 'bf16'):
        raise UserError('its precision is unknown')


def _modules(g_state, d_state, device, shape):
    # plain contiguous fp32 modules: the trained ones are channels_last
    G, D = Generator(shape=shape), Discriminator(shape)
    G.load_state_dict(g_state)
    D.load_state_dict(d_state)
    return G.to(device).eval(), D.to(device).eval()


def load_or_train_gan(images, seed, steps, batch_size=64, lr=2e-4, precision='auto', device='cpu',
                      cache_dir='cache', progress=True):
    """(G, D, info): from `cache_dir` when a valid file for exactly this public data, seed and
    hyper-parameters is there; else trained and cached. A cached file that fails to load, holds another
    key, anything but the networks' tensors, a malformed history, or weights that differ from their
    recorded digest is noted and retrained, never trusted and never an exception."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    key, digest = gan_cache_key(images, seed, steps, batch_size, lr, precision)
    shape = image_shape(images)
    path = os.path.join(cache_dir, f'gmi_gan_{digest}.pt')

    def restore(saved):
        if not isinstance(saved, dict):
            raise UserError('it is not a dict')
        if saved['key'] != key:
            raise UserError('it was trained for other data or settings')
        _check_state(saved['generator'], Generator(shape=shape), 'generator')
        _check_state(saved['discriminator'], Discriminator(shape), 'discriminator')
        if state_digest(saved['generator'], saved['discriminator']) != saved['weights_sha256']:
            raise UserError('weights do not match their recorded digest')
        _check_info(saved)
        info = {k: saved[k] for k in ('train_seconds', 'history', 'precision')}
        return (*_modules(saved['generator'], saved['discriminator'], device, shape),
                dict(info, cache_path=path, from_cache=True))

    cached = load_cached(path, 'GAN', restore)
    if cached is not None:
        return cached

    t0 = time.perf_counter()
    G, D, history = train_gan(images, seed, steps, batch_size, lr, precision, device, progress)
    train_seconds = time.perf_counter() - t0
    g_state = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    d_state = {k: v.detach().cpu().contiguous() for k, v in D.state_dict().items()}
    save_torch({'key': key, 'generator': g_state, 'discriminator': d_state, 'train_seconds': train_seconds,
                'history': history, 'precision': precision, 'weights_sha256': state_digest(g_state, d_state)}, path)
    info = {'train_seconds': train_seconds, 'history': history, 'precision': precision}
    return (*_modules(g_state, d_state, device, shape), dict(info, cache_path=path, from_cache=False))
