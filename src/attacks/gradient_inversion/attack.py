"""Gradient inversion: recover a client's training images and labels from the gradient it sends.

Threat model: an honest-but-curious server that knows the model weights it sent out and the
batch size, and sees one gradient a client computed on one training batch (after the client's
defenses; with secure aggregation only the mean over the round's clients). Labels are
recovered from the gradient, never given.

Methods (--gi-method):
  dlg      Zhu et al. 2019: dummy image and soft label optimised jointly with L-BFGS so the dummy's
           gradient matches the client's (L2 distance).
  idlg     Zhao et al. 2020: the label read off the last layer's gradient (its only negative bias
           gradient entry), then L-BFGS on the image alone.
  default  What the gradient gives away exactly, then a search constrained by it:
           1. label as iDLG;
           2. fc1's input (the 1600 conv features a2) in closed form: dL/dW_fc1 = d (x) a2 and
              dL/db_fc1 = d, so every row of the weight gradient is a2 scaled by that row's bias gradient;
           3. the gradient reaching the features, G = W_fc1^T dL/db_fc1, is then known too. Both survive
              an unknown dropout mask: the mask acts after fc1 and is already inside dL/db_fc1;
           4. with G known, each conv layer's weight gradient is linear in that layer's input given the
              max-pool/ReLU pattern (R-GAP, Zhu & Blaschko 2021): dL/dW_conv2 = delta2 * patches(a1),
              dL/dW_conv1 = delta1 * patches(x). The image is found by matching a2 (weighted 10x) and
              both conv weight gradients plus a total-variation prior (Geiping et al. 2020), with the
              pattern re-read from the current estimate at every step, all images and restarts as one
              batch, from a black start and a public mean-image start; each image keeps the start whose
              features match the closed-form fc1 input best. Pixels in rows/columns 26-27 never reach
              fc1 (floor pooling), so they keep that start.
           Batches: the fc1 weight gradient is a sum of B rank-one terms d_b a2_b^T; an fc1 unit active
           (ReLU, dropout) for one image only gives that image's a2 exactly, so when every image has
           such a unit all B a2's are separated, each image's d_b follows by least squares (and its
           exact label, as iDLG's, from d_b), and the search above runs with the batch-averaged conv
           gradients. Batches that do not separate fall back to cosine matching of the whole gradient
           with a TV prior (Geiping et al. 2020) and label counts from the last-layer bias (Wainakh et
           al. 2022).
  The recorded FedAvg updates (--gi-rounds): Geiping et al.'s multi-step attack, see attack_rounds.
"""
import argparse
import contextlib
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from src.client import autocast
from src.metrics import mse, psnr, ssim
from src.model import MEAN, STD
from src.plots import save_image_grid
from src.utils import UserError

NAMES = ('conv1.weight', 'conv1.bias', 'conv2.weight', 'conv2.bias', 'fc1.weight', 'fc1.bias',
         'fc2.weight', 'fc2.bias')
NUM_CLASSES = 10


def add_arguments(parser):
    g = parser.add_argument_group('gradient inversion')
    g.add_argument('--gi-method', choices=['dlg', 'idlg', 'default'], default='default',
                   help='dlg (Zhu 2019), idlg (Zhao 2020) or default (closed-form fc1 input + conv gradients)')
    g.add_argument('--gi-images', type=int, default=10, help='client images attacked (default 10)')
    g.add_argument('--gi-batch-size', type=int, default=1,
                   help='images per intercepted gradient (1, 2, 4, 8, ...; default 1)')
    g.add_argument('--gi-dropout', choices=['off', 'unknown', 'both'], default='both',
                   help="client's dropout: off (papers' case), unknown (train-mode mask the server does not "
                        'know), or both (default)')
    g.add_argument('--gi-iterations', type=int, default=None,
                   help=f'optimiser iterations (default: 300 L-BFGS for dlg/idlg; default method: {STEPS} Adam '
                        f'steps, {BATCH_STEPS} for batches)')
    g.add_argument('--gi-restarts', type=int, default=2,
                   help='default method: starts per image, batched (black, public mean image, then noise); '
                        'the one whose features match the recovered fc1 input best is kept (default 2)')
    g.add_argument('--gi-rounds', action=argparse.BooleanOptionalAction, default=True,
                   help='also attack the recorded FedAvg update of every client in every captured round '
                        '(--no-gi-rounds skips it)')
    g.add_argument('--gi-rounds-dummies', type=int, default=4, help='dummy images per attacked update (default 4)')
    # On the standard preset (mnist-10k) the dummies' PSNR to the nearest client image, mean over rounds,
    # was 13.9 / 12.7 / 11.6 / 11.5 dB after 10 / 20 / 40 / 80 steps: more steps fit the update's
    # direction better without finding a client's image, so 10 is the default, at a quarter of 40's time.
    g.add_argument('--gi-rounds-steps', type=int, default=10, help='Adam steps per captured round (default 10)')
    g.add_argument('--gi-rounds-local-steps', type=int, default=None,
                   help='local SGD steps simulated on the dummies (default: the recorded local epochs)')
    g.add_argument('--gi-precision', choices=['fp32', 'train'], default='fp32',
                   help="arithmetic of the client's gradient: fp32, or the precision training used (bf16 here)")


# ----------------------------------------------------------------------------- the client's side

def client_gradients(model, images, labels, batch_size, dropout, precision='fp32', seed=0):
    """The gradients clients send: one per consecutive group of `batch_size` images.

    Each is the gradient of the mean cross-entropy over its batch under `model`, computed the way
    a client does it: train mode when `dropout` (a fresh random mask the server never sees), else
    eval mode. Returns {name: (n_batches, *shape)} in fp32.
    """
    n = len(labels) // batch_size
    params = [p for _, p in model.named_parameters()]
    was_training = model.training
    model.train(dropout)
    torch.manual_seed(seed)  # the dropout masks
    out = []
    for b in range(n):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        with autocast(images.device, precision):
            loss = F.cross_entropy(model(images[sl]), labels[sl])
        out.append([g.detach().float() for g in torch.autograd.grad(loss, params)])
    model.train(was_training)
    return {name: torch.stack([o[i] for o in out]) for i, (name, _) in enumerate(model.named_parameters())}


# ----------------------------------------------------------------------------- what leaks exactly

def recover_labels(fc2_bias_grad, batch_size):
    """Labels of each intercepted batch from the last layer's bias gradient, (n_batches, batch_size).

    For cross-entropy, dL/db_fc2 = mean_i (p_i - onehot(y_i)): the true label is the only negative
    entry for one image (iDLG). For batches, Wainakh et al. 2022 (LLG): every class with a negative
    entry is present, and the counts follow from the size of the negative entries; B * (-db_j) is
    count_j minus the model's summed confidence in class j, so counts are apportioned to the
    negative mass (largest remainder), at least one per present class.
    """
    g = fc2_bias_grad
    if batch_size == 1:
        return g.argmin(1, keepdim=True)
    labels = []
    for row in g:
        neg = (-row).clamp_min(0)
        present = (neg > 0).nonzero().flatten().tolist() or [int(row.argmin())]
        counts = {c: 1 for c in present[:batch_size]}
        left = batch_size - len(counts)
        if left > 0:
            share = neg / neg.sum().clamp_min(1e-30) * batch_size  # expected counts from the mass
            extra = {c: max(0.0, share[c].item() - 1) for c in counts}
            for _ in range(left):  # largest remaining expected count gets the next image
                c = max(extra, key=extra.get)
                counts[c] += 1
                extra[c] -= 1
        labels.append(sorted(c for c, k in counts.items() for _ in range(k)))
    return torch.tensor(labels, dtype=torch.long, device=g.device)


def recover_fc_input(weight_grad, bias_grad):
    """Input of a linear layer from its gradients, batch size 1: rows of dW are dL/db_i * input.

    Least squares over all rows (weighted by dL/db_i), so it is exact whenever any dL/db_i != 0.
    weight_grad (N, out, in), bias_grad (N, out) -> (N, in).
    """
    return torch.einsum('no,noi->ni', bias_grad, weight_grad) / bias_grad.pow(2).sum(1, keepdim=True).clamp_min(1e-30)


# ----------------------------------------------------------------------------- batched gradients

def forward_parts(model, x):
    z = (x - MEAN) / STD
    c1 = model.conv1(z)
    p1 = F.max_pool2d(F.relu(c1), 2)
    c2 = model.conv2(p1)
    a2 = F.max_pool2d(F.relu(c2), 2).flatten(1)
    return z, c1, p1, c2, a2


def per_example_grads(model, x, targets, create_graph=False):
    """Gradient of each example's cross-entropy (soft targets (N, 10)) w.r.t. every weight, (N, *shape).

    One forward and one backward for the whole batch: autograd gives the gradient at each layer's
    output, and each weight gradient is that times the layer's input (an outer product for FC
    layers, a product with the unfolded input patches for convolutions). Eval mode (no dropout):
    the attacker cannot reproduce a client's mask.
    """
    if not x.requires_grad:  # the layer-output gradients need a graph even when x is data
        x = x.detach().requires_grad_(True)
    z, c1, p1, c2, a2 = forward_parts(model, x)
    f1 = model.fc1(a2)
    h = F.relu(f1)
    logits = model.fc2(h)
    loss = -(targets * F.log_softmax(logits, 1)).sum()
    d_out, d_f1, d_c2, d_c1 = torch.autograd.grad(loss, [logits, f1, c2, c1], create_graph=create_graph)
    n = len(x)
    return {
        'conv1.weight': torch.bmm(d_c1.flatten(2), F.unfold(z, 3).transpose(1, 2)).view(n, 32, 1, 3, 3),
        'conv1.bias': d_c1.sum((2, 3)),
        'conv2.weight': torch.bmm(d_c2.flatten(2), F.unfold(p1, 3).transpose(1, 2)).view(n, 64, 32, 3, 3),
        'conv2.bias': d_c2.sum((2, 3)),
        'fc1.weight': d_f1[:, :, None] * a2[:, None, :],
        'fc1.bias': d_f1,
        'fc2.weight': d_out[:, :, None] * h[:, None, :],
        'fc2.bias': d_out,
    }


def batch_grads(model, x, targets, batch_size, create_graph=False):
    """Gradients of the mean loss over each consecutive group of batch_size examples, (n_batches, *shape)."""
    g = per_example_grads(model, x, targets, create_graph)
    return {k: v.view(-1, batch_size, *v.shape[1:]).mean(1) for k, v in g.items()}


def flat(grads, names=NAMES):
    return torch.cat([grads[k].flatten(1) for k in names], 1)


def tv(x):
    return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1) + \
        (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)


# ----------------------------------------------------------------------------- attacks

def _rel(a, b):
    return (a - b).pow(2).flatten(1).sum(1) / b.pow(2).flatten(1).sum(1).clamp_min(1e-30)


def lbfgs_one(model, grads, label, iterations, soft_label, generator):
    """DLG / iDLG on one gradient (batch size 1): L-BFGS on the L2 gradient distance.

    The distance is divided by |target gradient|^2, a constant, so the minimiser is the papers'
    but fp32 L-BFGS does not stall on the tiny gradients of a trained model.
    Returns (image (1,1,28,28), label, final distance).
    """
    device = grads['fc1.bias'].device
    target = flat(grads)
    x = torch.rand(1, 1, 28, 28, generator=generator).to(device).requires_grad_(True)
    params = [x]
    if soft_label:
        y = torch.randn(1, NUM_CLASSES, generator=generator).to(device).requires_grad_(True)
        params.append(y)
    else:
        y_onehot = F.one_hot(label.view(1), NUM_CLASSES).float()
    # as the papers' code: LBFGS(lr=1) with its defaults (up to 20 inner iterations per step), stepped
    # `iterations` times
    opt = torch.optim.LBFGS(params, lr=1)

    def closure():
        opt.zero_grad()
        t = F.softmax(y, 1) if soft_label else y_onehot
        d = _rel(flat(per_example_grads(model, x, t, create_graph=True)), target).sum()
        if torch.isfinite(d):
            d.backward()
        return d

    first = None
    for _ in range(iterations):
        d = opt.step(closure)
        first = d.item() if first is None else first
        if not torch.isfinite(d) or d.item() > 1e3 * first:  # diverged: the caller restarts
            break
    with torch.no_grad():
        t = F.softmax(y, 1) if soft_label else y_onehot
    with torch.enable_grad():
        d = _rel(flat(per_example_grads(model, x.detach().requires_grad_(True), t)), target)
    lab = t.argmax(1) if soft_label else label.view(1)
    return x.detach(), lab, d.detach()


# The closed-form fc1 input is exact information, the conv-gradient terms hold the detail: weighting
# the a2 match 10x lifted the worst of 10 images from 21 to 26 dB (measured 1, 3, 10, 30, 100).
A2_WEIGHT, W1_WEIGHT, TV_WEIGHT = 10.0, 0.1, 1e-2
# Adam's step size and steps, and when each image's start is chosen: over 8 sets of 10 images, both
# dropout cases, 100 steps at 0.7 choosing at 30 % gave 46.8 dB mean / 27.0 worst in 0.66 s, where
# 300 steps at 0.1 (the first setting) gave 45.4 / 26.7 in 2.8 s (on the less trained quick model,
# 4 sets: 43.5 / 24.9 against 47.3 / 24.1). Batches share their conv terms and
# need longer: at batch size 2 the worst image went from 20 dB at 100 steps to 27 at 200.
LR, STEPS, BATCH_STEPS, SELECT_AT = 0.7, 100, 200, 0.3


def feature_terms(model, x, a2_target, G, W2_target, W1_target, batch_size=1):
    """Per-image distance for the default method, and its a2 part alone.

    a2 must match the closed-form fc1 input; the conv weight gradients must match those the
    client sent, computed from the known dL/da2 = G through this estimate's pool/ReLU pattern.
    The pattern is piecewise constant in x, so the products below carry x's gradient through the
    layer inputs, as in R-GAP's linear equations. For batches, G holds each image's own dL/da2
    and the conv gradients are averaged over the batch as the client's are; each batch's conv
    terms are shared among its images.
    """
    z, c1, p1, c2, a2 = forward_parts(model, x)
    d2, d1 = torch.autograd.grad((a2 * G).sum(), [c2, c1], retain_graph=True)
    dW2 = torch.bmm(d2.flatten(2), F.unfold(p1, 3).transpose(1, 2))
    dW1 = torch.bmm(d1.flatten(2), F.unfold(z, 3).transpose(1, 2))
    if batch_size > 1:
        dW2, dW1 = (w.view(-1, batch_size, *w.shape[1:]).mean(1) for w in (dW2, dW1))
    conv = _rel(dW2, W2_target) + W1_WEIGHT * _rel(dW1, W1_target)
    a2_dist = _rel(a2, a2_target)
    return A2_WEIGHT * a2_dist + conv.repeat_interleave(batch_size) / batch_size + TV_WEIGHT * tv(x), a2_dist


def separate_fc_inputs(weight_grad, bias_grad, batch_size, tol=1e-3):
    """Each image's fc1 input from one batch gradient, or None if the gradient does not give them all.

    dL/dW_fc1 = (1/B) sum_b d_b a2_b^T: row i is a mix of the images whose fc1 unit i is active
    (ReLU, and dropout when on). A unit active for one image only gives that image's a2 exactly
    (row / bias gradient), and such rows repeat for every unit exclusive to that image. Candidates
    are the row ratios, grouped when equal, kept if non-negative (a2 is after ReLU and max-pool),
    most repeated first, each added if outside the span of those kept. Success when B of them
    explain the whole weight gradient (relative residual < tol). Returns (a2 (B, in), d (B, out)).
    """
    ok = bias_grad.abs() > 1e-6 * bias_grad.abs().max()
    rows = weight_grad[ok] / bias_grad[ok, None]
    norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    close = ((rows[:, None] - rows[None]).norm(dim=2) / norms) < tol  # (k, k)
    groups, seen = [], torch.zeros(len(rows), dtype=torch.bool)
    for i in range(len(rows)):
        if not seen[i]:
            members = close[i] & ~seen
            seen |= members
            groups.append((int(members.sum()), rows[members].mean(0)))
    groups.sort(key=lambda g: -g[0])
    chosen = []
    for _, cand in groups:
        if cand.min() < -tol * cand.abs().max():
            continue
        if chosen:
            A = torch.stack(chosen)
            coef = torch.linalg.lstsq(A.T, cand[:, None]).solution
            if (A.T @ coef - cand[:, None]).norm() < tol * cand.norm():
                continue
        chosen.append(cand)
        if len(chosen) == batch_size:
            break
    if len(chosen) < batch_size:
        return None
    A = torch.stack(chosen)  # (B, in)
    Dt = torch.linalg.lstsq(A.T, weight_grad.T).solution  # dW^T = A^T (D^T/B)^T  ->  (B, out) = d_b / B
    if (A.T @ Dt - weight_grad.T).norm() > tol * weight_grad.norm():
        return None
    return A, Dt * batch_size


def labels_from_fc1_output_grads(model, d):
    """Labels from each image's gradient at fc1's output, d (N, 128).

    Where unit i is active (and kept by dropout), d_i = c * (W_fc2^T (p - onehot(y)))_i with c = 1,
    or 1/(1-p) under dropout; elsewhere d_i = 0. Solving on the nonzero units gives p - onehot(y)
    up to that positive scale, and its only negative entry is the label (as iDLG's).
    """
    out = []
    for row in d:
        active = row.abs() > 1e-6 * row.abs().max()
        e = torch.linalg.lstsq(model.fc2.weight[:, active].T, row[active, None]).solution[:, 0]
        out.append(int(e.argmin()))
    return torch.tensor(out, device=d.device)


def descend(x, loss_fn, steps, lr, schedule=True, desc=None, progress=False, narrow=None):
    """Adam on the images x (kept in [0, 1]) minimising loss_fn(x), one loss per row of x.

    A loss that turns non-finite is left out of the step (its gradient zeroed) and flagged, so one
    diverging reconstruction cannot poison the others in the batch. With `schedule` the step size is
    cut 5x at 60 % and 85 % of the steps. narrow=(step, choose): at that step only the rows
    choose(x) returns go on, with their Adam moments (each image's most promising start, so the
    remaining steps cost less), and loss_fn must accept the narrower x.
    Returns (x, diverged mask (rows,)).
    """
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(steps * 0.6), int(steps * 0.85)], 0.2) if schedule else None
    diverged = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for step in tqdm(range(steps), desc=desc, unit='step', leave=False, disable=not progress):
        if narrow is not None and step == narrow[0]:
            rows = narrow[1](x.detach())
            moments = opt.state.pop(x)
            x = x.detach()[rows].requires_grad_(True)
            opt.param_groups[0]['params'] = [x]
            opt.state[x] = {k: v[rows] if v.dim() else v for k, v in moments.items()}
            diverged = diverged[rows]
        d = loss_fn(x)
        bad = ~torch.isfinite(d)
        diverged |= bad
        opt.zero_grad()
        d.masked_fill(bad, 0).sum().backward()
        with torch.no_grad():
            x.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach(), diverged


def invert_features(model, a2_target, G, W2, W1, batch_size, steps, restarts, generator, prior_image=None,
                    progress=True):
    """The default attack's search: every image and restart in one batch.

    a2_target, G: (N, 1600) per image; W2, W1: (N / batch_size, ...) per intercepted gradient.
    Starts: black (MNIST's background), then `prior_image` (a public mean image; flat gray 0.5 if
    none), then small noise. The pool/ReLU pattern makes the search land in different basins from
    different starts; each image keeps the start whose features match the closed-form fc1 input
    best (exact information, and a better guide than the total loss: measured, worst of 10 images
    26.5 vs 21 dB). The choice is made after SELECT_AT of the steps and only the chosen start goes
    on (choosing at step 40 of 150 kept the same starts as choosing at the end, 20 of 20 images).
    Returns (images (N,1,28,28), a2 distance (N,), failed (N,) bool).
    """
    n = a2_target.shape[0]
    x0 = torch.zeros(restarts, n, 1, 28, 28)
    if restarts > 1:
        x0[1] = 0.5 if prior_image is None else prior_image.detach().cpu().reshape(1, 1, 28, 28)
    if restarts > 2:
        x0[2:] = 0.1 * torch.rand(x0[2:].shape, generator=generator)
    x = x0.flatten(0, 1).to(G.device).requires_grad_(True)
    rep = lambda t: t.repeat(restarts, *([1] * (t.dim() - 1)))  # noqa: E731  restart-major
    every_start = [rep(t) for t in (a2_target, G, W2, W1)]

    def loss(x):
        targets = every_start if len(x) > n else (a2_target, G, W2, W1)
        return feature_terms(model, x, *targets, batch_size)[0]

    def best_start(x):
        with torch.enable_grad():  # feature_terms differentiates through the layers
            _, a2_dist = feature_terms(model, x.requires_grad_(True), *every_start, batch_size)
        a2_dist = torch.nan_to_num(a2_dist.detach(), nan=math.inf).view(restarts, n)
        return a2_dist.argmin(0) * n + torch.arange(n, device=x.device)

    narrow = (int(steps * SELECT_AT), best_start) if restarts > 1 else None
    x, diverged = descend(x, loss, steps, LR, desc='gradient inversion', progress=progress, narrow=narrow)
    with torch.enable_grad():
        d, a2_dist = feature_terms(model, x.requires_grad_(True), a2_target, G, W2, W1, batch_size)
    bad = diverged | ~torch.isfinite(d.detach()) | ~torch.isfinite(a2_dist.detach())
    dist = torch.where(bad, torch.full_like(a2_dist, math.inf), a2_dist.detach())
    return x.detach(), dist, bad


def invert_default_b1(model, grads, steps, restarts, generator, prior_image=None, progress=True):
    """Batch size 1: label and fc1 input in closed form, then the feature search.

    Returns (images (N,1,28,28), labels (N,), a2 distance (N,), failed (N,) bool).
    """
    labels = recover_labels(grads['fc2.bias'], 1)[:, 0]
    a2_target = recover_fc_input(grads['fc1.weight'], grads['fc1.bias'])
    G = grads['fc1.bias'] @ model.fc1.weight  # dL/da2, exact whatever the dropout mask
    W2, W1 = grads['conv2.weight'].flatten(2), grads['conv1.weight'].flatten(2)
    images, dist, failed = invert_features(model, a2_target, G, W2, W1, 1, steps, restarts, generator,
                                           prior_image, progress)
    return images, labels, dist, failed


def invert_default_batch(model, grads, batch_size, steps, restarts, generator, prior_image=None, progress=True):
    """Batches: separate each image's fc1 input where the gradient allows, then the feature search.

    Batches whose fc1 gradient does not separate into batch_size images fall back to cosine
    matching (Geiping et al.) with the label counts. Separated images get exact labels from their
    own fc1 output gradient.
    Returns (images, labels (n_batches*B,), failed (n_batches*B,), separated (n_batches,) bool).
    """
    counts = recover_labels(grads['fc2.bias'], batch_size)
    n_batches = counts.shape[0]
    parts = [separate_fc_inputs(grads['fc1.weight'][i], grads['fc1.bias'][i], batch_size) for i in range(n_batches)]
    sep = torch.tensor([p is not None for p in parts])
    B = batch_size
    images = torch.zeros(n_batches * B, 1, 28, 28, device=grads['fc1.bias'].device)
    labels, failed = counts.clone(), torch.zeros(n_batches * B, dtype=torch.bool)
    if sep.any():
        a2 = torch.cat([p[0] for p in parts if p is not None])
        d = torch.cat([p[1] for p in parts if p is not None])
        keep = sep.nonzero().flatten()
        W2 = grads['conv2.weight'][keep].flatten(2)
        W1 = grads['conv1.weight'][keep].flatten(2)
        x, _, f = invert_features(model, a2, d @ model.fc1.weight, W2, W1, B, steps, restarts, generator,
                                  prior_image, progress)
        labels[keep] = labels_from_fc1_output_grads(model, d).view(-1, B)
        idx = (keep[:, None] * B + torch.arange(B)).flatten()
        images[idx], failed[idx] = x, f.cpu()
    if (~sep).any():
        rest = (~sep).nonzero().flatten()
        sub = {k: v[rest] for k, v in grads.items()}
        x, _, f = invert_cosine(model, sub, counts[rest], B, steps, generator, progress=progress)
        idx = (rest[:, None] * B + torch.arange(B)).flatten()
        images[idx], failed[idx] = x, f.repeat_interleave(B).cpu()
    return images, labels.reshape(-1), failed, sep


def invert_cosine(model, grads, labels, batch_size, steps, generator, tv_weight=1e-4, progress=True):
    """Geiping et al. 2020 for whole batches: Adam on 1 - cos(dummy gradient, client gradient) + TV.

    grads hold n_batches gradients of batch_size images each; labels (n_batches, batch_size) are the
    recovered ones. All batches are reconstructed together as one tensor computation.
    Returns (images (n_batches*batch_size,1,28,28), distance (n_batches,), failed (n_batches,)).
    """
    target = flat(grads)
    onehot = F.one_hot(labels.reshape(-1), NUM_CLASSES).float()
    x = 0.1 * torch.rand(target.shape[0], batch_size, 1, 28, 28, generator=generator)  # a row per batch
    x = x.to(target.device).requires_grad_(True)

    def distance(x):
        g = flat(batch_grads(model, x.flatten(0, 1), onehot, batch_size, create_graph=True))
        cos = 1 - F.cosine_similarity(g, target, dim=1, eps=1e-30)
        return cos + tv_weight * tv(x.flatten(0, 1)).view(-1, batch_size).sum(1)

    x, diverged = descend(x, distance, steps, 0.05, desc='gradient inversion (batches)', progress=progress)
    with torch.enable_grad():
        d = distance(x.requires_grad_(True)).detach()
    failed = diverged | ~torch.isfinite(d)
    return x.detach().flatten(0, 1), d, failed


def invert(model, grads, method, batch_size, iterations=None, restarts=2, seed=0, progress=True, prior_image=None):
    """Attack every intercepted gradient in `grads` ({name: (n_batches, *shape)}).

    Returns images (n_batches*batch_size, 1, 28, 28), recovered labels (n_batches*batch_size,),
    failed (n_batches*batch_size,) bool. Failed means the optimisation produced NaN/inf or its
    gradient distance exploded on every try; such images are black and flagged, never passed off.
    """
    with frozen(model):
        return _invert(model, grads, method, batch_size, iterations, restarts, seed, progress, prior_image)


@contextlib.contextmanager
def frozen(model):
    """Eval mode, no weight gradients (only the dummy images are optimised); restored afterwards."""
    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _invert(model, grads, method, batch_size, iterations, restarts, seed, progress, prior_image):
    generator = torch.Generator().manual_seed(seed)
    n_batches = grads['fc2.bias'].shape[0]
    if method in ('dlg', 'idlg'):
        if batch_size != 1:
            raise UserError(f'--gi-method {method} attacks single-image gradients: use --gi-batch-size 1')
        iterations = iterations or 300
        images, labels, failed = [], [], []
        recovered = recover_labels(grads['fc2.bias'], 1)[:, 0]
        for i in tqdm(range(n_batches), desc=method, unit='image', leave=False, disable=not progress):
            one = {k: v[i:i + 1] for k, v in grads.items()}
            for _attempt in range(3):  # restart from a fresh random image if L-BFGS blew up
                x, lab, d = lbfgs_one(model, one, recovered[i], iterations, method == 'dlg', generator)
                ok = bool(torch.isfinite(x).all() and torch.isfinite(d).all())
                if ok:
                    break
            images.append(x.clamp(0, 1) if ok else torch.zeros_like(x))
            labels.append(lab)
            failed.append(not ok)
        return torch.cat(images), torch.cat(labels), torch.tensor(failed)
    if method != 'default':
        raise UserError(f'unknown --gi-method {method!r}: choose dlg, idlg or default')
    if batch_size == 1:
        images, labels, _, failed = invert_default_b1(model, grads, iterations or STEPS, restarts, generator,
                                                      prior_image, progress)
        images = torch.where(failed[:, None, None, None], torch.zeros_like(images), images)
        return images, labels, failed
    images, labels, failed, _ = invert_default_batch(model, grads, batch_size, iterations or BATCH_STEPS, restarts,
                                                     generator, prior_image, progress)
    images = torch.where(failed[:, None, None, None].to(images.device), torch.zeros_like(images), images)
    return images, labels, failed


def match_to_originals(recon, labels, originals, batch_size):
    """Within each batch, pair reconstructions with originals by optimal assignment on MSE."""
    if batch_size == 1:
        return recon, labels
    from scipy.optimize import linear_sum_assignment
    recon, labels = recon.clone(), labels.clone()
    for s in range(0, len(recon), batch_size):
        r, o = recon[s:s + batch_size], originals[s:s + batch_size]
        cost = (r[:, None] - o[None]).pow(2).flatten(2).mean(2).cpu().numpy()  # (recon, original)
        rows, cols = linear_sum_assignment(cost)
        order = torch.as_tensor(rows[np.argsort(cols)], device=recon.device)
        recon[s:s + batch_size] = r[order]
        labels[s:s + batch_size] = labels[s:s + batch_size][order]
    return recon, labels


def label_count_accuracy(true, recovered, batch_size):
    """Fraction of labels recovered, per batch as multisets (order inside a batch is unknowable)."""
    hits = 0
    for s in range(0, len(true), batch_size):
        t = torch.bincount(true[s:s + batch_size], minlength=NUM_CLASSES)
        r = torch.bincount(recovered[s:s + batch_size], minlength=NUM_CLASSES)
        hits += torch.minimum(t, r).sum().item()
    return hits / len(true)


def score(originals, recon, true_labels, rec_labels, failed, batch_size):
    recon, rec_labels = match_to_originals(recon, rec_labels, originals, batch_size)
    p, s, e = psnr(recon, originals), ssim(recon, originals), mse(recon, originals)
    return recon, rec_labels, {
        'psnr_mean': p.mean().item(), 'psnr_min': p.min().item(),
        'ssim_mean': s.mean().item(), 'ssim_min': s.min().item(),
        'mse_mean': e.mean().item(), 'mse_max': e.max().item(),
        'label_accuracy': label_count_accuracy(true_labels, rec_labels, batch_size),
        'n_failed': int(failed.sum()),
        'per_image': [{'true_label': int(t), 'recovered_label': int(r), 'psnr': pi.item(), 'ssim': si.item(),
                       'mse': ei.item(), 'failed': bool(f)}
                      for t, r, pi, si, ei, f in zip(true_labels, rec_labels, p, s, e, failed)],
    }


def pick_images(target, n, seed):
    """n distinct training images of the clients, picked by seed: a client at random, then one of its images."""
    rng = np.random.default_rng(seed)
    clients = [c for c, idx in enumerate(target.client_indices) if len(idx)]
    total = sum(len(target.client_indices[c]) for c in clients)
    if n > total:
        raise UserError(f'asked for {n} images to attack but the clients hold only {total}')
    chosen, owners = [], []
    while len(chosen) < n:
        c = int(rng.choice(clients))
        i = int(rng.choice(target.client_indices[c]))
        if i not in chosen:
            chosen.append(i)
            owners.append(c)
    return np.array(chosen), owners


def clients_logits(w, x):
    """The CNN's eval-mode forward with a different set of weights per client, all clients at once.

    w: {name: (C, *shape)}; x: (C, B, 1, 28, 28). Clients become channel groups of grouped
    convolutions and batch dimensions of bmm, so C local trainings run as one computation.
    """
    C, B = x.shape[:2]
    z = ((x - MEAN) / STD).transpose(0, 1).reshape(B, C, 28, 28)
    c1 = F.conv2d(z, w['conv1.weight'].flatten(0, 1), w['conv1.bias'].flatten(), groups=C)
    p1 = F.max_pool2d(F.relu(c1), 2)
    c2 = F.conv2d(p1, w['conv2.weight'].flatten(0, 1), w['conv2.bias'].flatten(), groups=C)
    a2 = F.max_pool2d(F.relu(c2), 2).reshape(B, C, -1).transpose(0, 1)  # (C, B, 1600), the CNN's order
    h = F.relu(torch.baddbmm(w['fc1.bias'][:, None], a2, w['fc1.weight'].transpose(1, 2)))
    return torch.baddbmm(w['fc2.bias'][:, None], h, w['fc2.weight'].transpose(1, 2))  # (C, B, 10)


def simulate_updates(global_w, x, labels, local_steps, lr):
    """Each client's update after `local_steps` SGD steps on its dummy batch, differentiable in x."""
    w = {k: v.expand(x.shape[0], *v.shape).clone().requires_grad_(True) for k, v in global_w.items()}
    for _ in range(local_steps):
        logits = clients_logits(w, x)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction='none').view(labels.shape)
        g = torch.autograd.grad(loss.mean(1).sum(), list(w.values()), create_graph=True)
        w = {k: v - lr * gk for (k, v), gk in zip(w.items(), g)}
    return {k: w[k] - global_w[k] for k in NAMES}


def invert_updates(global_w, deltas, labels, local_steps, lr, steps, generator, tv_weight=1e-4):
    """Geiping et al. 2020's multi-step attack: dummy images whose simulated local training gives an
    update of the same direction as the recorded one (1 - cosine + TV), all clients as one batch.
    deltas: {name: (C, *shape)}; labels (C, B). Returns (images (C*B, 1, 28, 28), failed (C,))."""
    C, B = labels.shape
    target = flat(deltas)
    x = (0.1 * torch.rand(C, B, 1, 28, 28, generator=generator)).to(target.device).requires_grad_(True)

    def distance(x):
        sim = flat(simulate_updates(global_w, x, labels, local_steps, lr))
        return 1 - F.cosine_similarity(sim, target, dim=1, eps=1e-30) + tv_weight * tv(x.flatten(0, 1)).view(C, B).sum(1)

    x, diverged = descend(x, distance, steps, 0.05, schedule=False)
    return x.flatten(0, 1), diverged


def attack_rounds(target, dummies, steps, seed, local_steps=None, progress=True):
    """Invert the real FedAvg updates the server recorded, every client of every captured round.

    A client's update is many local SGD steps (epochs x batches) on hundreds of images. As Geiping et
    al. 2020, the local training is simulated differentiably on `dummies` dummy images per client
    (`local_steps` full-batch SGD steps at the recorded learning rate; default: one per local epoch,
    i.e. the client's epochs over a dummy set smaller than one batch), and the dummies are optimised
    so that the simulated update points the way the recorded one does (cosine + TV), all clients of
    a round as one batch. Dummy labels come from the update's last-layer bias (LLG-style counts).
    Leakage is each dummy's PSNR to the client's real image it resembles most (optimal assignment,
    distinct images), next to two guesses that use no update: the public mean image, and a black
    image (the best dummy's score is only meaningful above that one's). With secure aggregation the record holds only the round's sum: it is attacked as one update
    scored against all clients' images.
    """
    from scipy.optimize import linear_sum_assignment
    record = target.captured
    meta = record['meta']
    local_steps = local_steps or int(meta.get('local_epochs') or 1)
    generator = torch.Generator().manual_seed(seed)
    prior = target.test_x.mean(0, keepdim=True)
    all_clients = list(range(len(target.client_indices)))
    rounds, shown = [], []
    for rd in tqdm(record['rounds'], desc='gradient inversion (FedAvg rounds)', unit='round', disable=not progress):
        global_w = {k: rd['global_state'][k].float().contiguous().to(target.device) for k in NAMES}
        sent = rd.get('updates') or [{'client': None, **rd['aggregate']}]
        deltas = {k: torch.stack([u['delta'][k].float().to(target.device) for u in sent]) for k in NAMES}
        labels = recover_labels(-deltas['fc2.bias'], dummies)  # the update is minus lr times summed gradients
        images, failed = invert_updates(global_w, deltas, labels, local_steps, meta['learning_rate'], steps,
                                        generator)
        row = {'round': rd['round'], 'clients': []}
        for j, u in enumerate(sent):
            owners = all_clients if u['client'] is None else [u['client']]
            idx = torch.as_tensor(np.concatenate([target.client_indices[c] for c in owners]), device=target.device)
            real = target.train_x[idx]
            rec = images[j * dummies:(j + 1) * dummies]
            cost = (rec[:, None] - real[None]).pow(2).flatten(2).mean(2)  # (dummies, client images)
            r, c = linear_sum_assignment(cost.cpu().numpy())
            p = psnr(rec[r], real[c])
            base = psnr(prior.expand(dummies, -1, -1, -1), real[(prior - real).pow(2).flatten(1).mean(1)
                                                                .topk(dummies, largest=False).indices])
            # what the best dummy's score means: a black image is this close to the client's sparsest digit
            blank = psnr(torch.zeros_like(real), real).max()
            row['clients'].append({'client': u['client'], 'client_images': len(idx), 'failed': bool(failed[j]),
                                   'psnr_mean': p.mean().item(), 'psnr_max': p.max().item(),
                                   'mean_image_psnr_mean': base.mean().item(), 'black_image_psnr_max': blank.item(),
                                   'dummy_labels': labels[j].tolist()})
            if j == 0:
                shown.append((rd['round'], rec[r][p.argmax()].cpu().numpy(), real[c][p.argmax()].cpu().numpy(),
                              p.max().item()))
        for key in ('psnr_mean', 'psnr_max', 'mean_image_psnr_mean', 'black_image_psnr_max'):
            row[key] = float(np.mean([c[key] for c in row['clients']]))
        rounds.append(row)
    return {'method': (f'simulated local training (Geiping et al. 2020): {dummies} dummy images per update, '
                       f'{local_steps} local SGD steps, cosine match of the update'),
            'dummies_per_update': dummies, 'steps_per_round': steps, 'simulated_local_steps': local_steps,
            'local_training': {k: record['meta'].get(k) for k in ('local_epochs', 'batch_size', 'learning_rate')},
            'rounds': rounds}, shown


def plot_rounds(path, result, shown):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from src.utils import atomic_path
    rounds = result['rounds']
    x = [r['round'] for r in rounds]
    n = len(shown)
    fig = plt.figure(figsize=(max(6.0, 1.1 * n), 5.5))
    grid = fig.add_gridspec(3, n, height_ratios=[2.2, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    ax.plot(x, [r['psnr_mean'] for r in rounds], 'o-', label='reconstruction, mean over dummies')
    ax.plot(x, [r['psnr_max'] for r in rounds], 's-', label='reconstruction, best dummy (mean over clients)')
    ax.plot(x, [r['mean_image_psnr_mean'] for r in rounds], 'k--', label='public mean image (no attack)')
    ax.plot(x, [r['black_image_psnr_max'] for r in rounds], 'k:', label='black image, nearest client image (no attack)')
    ax.set_xlabel('FedAvg round')
    ax.set_ylabel('PSNR to nearest client image (dB)')
    ax.set_title('leakage from recorded FedAvg updates, per round', fontsize=9)
    ax.legend(fontsize=7)
    for i, (rnd, rec, real, p) in enumerate(shown):
        for k, (img, title) in enumerate([(rec, f'r{rnd} {p:.1f}dB'), (real, 'nearest real')]):
            a = fig.add_subplot(grid[1 + k, i])
            a.imshow(np.clip(img[0], 0, 1), cmap='gray', vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(title, fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)


def run(target, args, out_dir):
    import os
    from src.defenses import active, defend_gradients
    started = time.perf_counter()
    method, bs, seed = args.gi_method, args.gi_batch_size, args.seed
    if bs < 1 or args.gi_images < 1:
        raise UserError('--gi-batch-size and --gi-images must be at least 1')
    if args.gi_restarts < 1 or (args.gi_iterations is not None and args.gi_iterations < 1):
        raise UserError('--gi-restarts and --gi-iterations must be at least 1')
    model, cfg = target.model, target.config
    precision = target.history.get('precision', 'fp32') if args.gi_precision == 'train' else 'fp32'
    defenses = active(cfg)
    # Secure aggregation: the server only sees the mean of the round's K clients' gradients, which is
    # the gradient of one batch of K * bs images, so that is the batch the attack faces.
    k = cfg.get('num_clients', 1) if cfg.get('secure_aggregation') else 1
    eff_bs = k * bs
    n_grads = max(1, math.ceil(args.gi_images * bs / eff_bs))
    if eff_bs > 1 and method != 'default':
        raise UserError(f'--gi-method {method} attacks single-image gradients; the server sees batches of '
                        f'{eff_bs} (secure aggregation over {k} clients x batch {bs}): use --gi-method default')
    index, owners = pick_images(target, n_grads * eff_bs, seed)
    idx = torch.as_tensor(index, device=target.device)
    originals, true_labels = target.train_x[idx], target.train_y[idx]
    prior = target.test_x.mean(0)  # public data of the same kind, never the clients' images
    cases = ['off', 'unknown'] if args.gi_dropout == 'both' else [args.gi_dropout]
    results, arrays, rows, titles = {}, {'originals': originals[:, 0].cpu().numpy(),
                                         'true_labels': true_labels.cpu().numpy(), 'indices': index}, [], []
    for case in cases:
        t0 = time.perf_counter()
        grads = client_gradients(model, originals, true_labels, bs, case == 'unknown', precision,
                                 seed=seed + 1)
        # what a defended client sends (DP-SGD clip+noise, update clip+noise, pruning), per client
        grads = defend_gradients(grads, cfg, torch.Generator().manual_seed(seed + 2))
        if k > 1:
            grads = {name: g.view(n_grads, k, *g.shape[1:]).mean(1) for name, g in grads.items()}
        recon, labels, failed = invert(model, grads, method, eff_bs, args.gi_iterations, args.gi_restarts, seed,
                                       prior_image=prior)
        seconds = time.perf_counter() - t0
        recon, labels, m = score(originals, recon, true_labels, labels, failed, eff_bs)
        m['seconds'] = seconds
        for row, c in zip(m['per_image'], owners):
            row['client'] = c
        results[f'dropout_{case}'] = m
        arrays[f'reconstructions_dropout_{case}'] = recon[:, 0].cpu().numpy()
        arrays[f'recovered_labels_dropout_{case}'] = labels.cpu().numpy()
        rows.append([r.cpu().numpy() for r in recon[:, 0]])
        titles.append([f"{'X ' if p['failed'] else ''}{p['recovered_label']} {p['psnr']:.1f}dB"
                       for p in m['per_image']])
    gray = psnr(torch.full_like(originals, 0.5), originals)
    mean_image = target.train_x.mean(0, keepdim=True).expand_as(originals)
    baseline = {'gray_0.5_psnr_mean': gray.mean().item(),
                'dataset_mean_psnr_mean': psnr(mean_image, originals).mean().item()}
    n_show = min(len(originals), 16)
    fig_rows = [[o.cpu().numpy() for o in originals[:n_show, 0]]] + [r[:n_show] for r in rows]
    fig_titles = [[f'label {int(y)}' for y in true_labels[:n_show]]] + [t[:n_show] for t in titles]
    save_image_grid(os.path.join(out_dir, 'gradient_inversion_idlg.png'), fig_rows, fig_titles,
                    row_labels=['original'] + [f'dropout {c}' for c in cases],
                    suptitle=f'gradient inversion ({method}, batch size {eff_bs}'
                             f"{', defenses: ' + '+'.join(defenses) if defenses else ''}): recovered label, PSNR")
    main_case = 'dropout_unknown' if 'unknown' in cases else f'dropout_{cases[0]}'
    main = results[main_case]
    out = {
        'method': method,
        'batch_size': eff_bs,
        'images': len(originals),
        'seed': seed,
        'threat_model': {
            'observed': (f'the mean gradient of {k} clients (secure aggregation), each on one training batch of '
                         f'{bs} image(s), under the global model: one batch of {eff_bs} images to the attacker'
                         if k > 1 else
                         f'one gradient of one training batch of {bs} image(s) per client, under the global model'),
            'model_weights': 'known', 'batch_size': 'known', 'labels': 'recovered from the gradient, not given',
            'dropout': {'off': "no dropout active (model in eval mode, the papers' case)",
                        'unknown': 'train mode with a random dropout mask the server does not know'},
            'client_precision': precision,
            'prior': 'default method: total variation, and the mean image of the public test split as one start',
            'defenses': defenses or 'none',
            'defense_settings': {key: cfg.get(key) for key in ('dp_noise_multiplier', 'dp_max_grad_norm',
                                                               'update_clip', 'update_noise', 'keep_fraction',
                                                               'secure_aggregation') if key in cfg},
        },
        **results,
        'main': {'case': main_case, **{key: v for key, v in main.items() if key != 'per_image'}},
        'baselines': baseline,
        'summary': (f"{main_case}: PSNR {main['psnr_mean']:.1f} dB mean / {main['psnr_min']:.1f} min, "
                    f"labels {100 * main['label_accuracy']:.0f}% (dataset-mean guess "
                    f"{baseline['dataset_mean_psnr_mean']:.1f} dB, gray {baseline['gray_0.5_psnr_mean']:.1f} dB)"),
    }
    if args.gi_rounds:
        if target.captured is None:
            raise UserError(f'no recorded updates at {target.captured_path} (run main.py, or pass --no-gi-rounds)')
        t0 = time.perf_counter()
        out['fedavg_rounds'], shown = attack_rounds(target, args.gi_rounds_dummies, args.gi_rounds_steps, seed,
                                                    args.gi_rounds_local_steps)
        out['fedavg_rounds']['seconds'] = time.perf_counter() - t0
        plot_rounds(os.path.join(out_dir, 'gradient_inversion_rounds.png'), out['fedavg_rounds'], shown)
        arrays['fedavg_rounds_best_dummy'] = np.stack([s[1][0] for s in shown])
    out['seconds'] = time.perf_counter() - started
    return out, arrays
