"""Gradient inversion: recover a client's training images and labels from the gradient it sends.

Threat model: an honest-but-curious server that knows the model weights it sent out and the
batch size, and sees one gradient a client computed on one training batch. Labels are
recovered from the gradient, never given.

Methods (--gi-method):
  dlg      Zhu et al. 2019: dummy image and soft label optimised jointly with L-BFGS so the dummy's
           gradient matches the client's (L2 distance).
  idlg     Zhao et al. 2020: the label read off the last layer's gradient (its only negative bias
           gradient entry), then L-BFGS on the image alone.
  default  What the gradient gives away exactly, then a search constrained by it:
           1. label as iDLG (for batches: counts from the last-layer bias gradient, Wainakh et al. 2022);
           2. fc1's input (the 1600 conv features a2) in closed form: dL/dW_fc1 = d (x) a2 and
              dL/db_fc1 = d, so every row of the weight gradient is a2 scaled by that row's bias gradient;
           3. the gradient reaching the features, G = W_fc1^T dL/db_fc1, is then known too. Both survive
              an unknown dropout mask: the mask acts after fc1 and is already inside dL/db_fc1;
           4. with G known, each conv layer's weight gradient is linear in that layer's input given the
              max-pool/ReLU pattern (R-GAP, Zhu & Blaschko 2021): dL/dW_conv2 = delta2 * patches(a1),
              dL/dW_conv1 = delta1 * patches(x). The image is found by matching a2 and both conv weight
              gradients, with the pattern re-read from the current estimate at every step, all images
              (and restarts) as one batch.
For batches larger than one the per-image closed forms do not apply (the gradient is a sum over
images); the default then matches the whole gradient by cosine distance with a total-variation
prior (Geiping et al. 2020) using the recovered label counts.
"""
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
                   help='optimiser iterations (default: 300 L-BFGS for dlg/idlg, 400 Adam steps for default)')
    g.add_argument('--gi-restarts', type=int, default=1,
                   help='independent starts per image, batched; the one matching the gradient best is kept')
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
    opt = torch.optim.LBFGS(params, lr=1, max_iter=iterations, history_size=100, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        t = F.softmax(y, 1) if soft_label else y_onehot
        d = _rel(flat(per_example_grads(model, x, t, create_graph=True)), target).sum()
        if torch.isfinite(d):
            d.backward()
        return d

    opt.step(closure)
    with torch.no_grad():
        t = F.softmax(y, 1) if soft_label else y_onehot
    with torch.enable_grad():
        d = _rel(flat(per_example_grads(model, x.detach().requires_grad_(True), t)), target)
    lab = t.argmax(1) if soft_label else label.view(1)
    return x.detach(), lab, d.detach()


W1_WEIGHT, TV_WEIGHT, LR = 0.1, 1e-2, 0.1


def feature_terms(model, x, a2_target, G, W2_target, W1_target):
    """Per-image distance for the default method (batch size 1).

    a2 must match the closed-form fc1 input; the conv weight gradients must match those the
    client sent, computed from the known dL/da2 = G through this estimate's pool/ReLU pattern.
    The pattern is piecewise constant in x, so the products below carry x's gradient through the
    layer inputs, as in R-GAP's linear equations.
    """
    z, c1, p1, c2, a2 = forward_parts(model, x)
    d2, d1 = torch.autograd.grad((a2 * G).sum(), [c2, c1], retain_graph=True)
    dW2 = torch.bmm(d2.flatten(2), F.unfold(p1, 3).transpose(1, 2))
    dW1 = torch.bmm(d1.flatten(2), F.unfold(z, 3).transpose(1, 2))
    return _rel(a2, a2_target) + _rel(dW2, W2_target) + W1_WEIGHT * _rel(dW1, W1_target) + TV_WEIGHT * tv(x)


def invert_default_b1(model, grads, steps, restarts, generator, progress=True):
    """The default attack for batch size 1, every gradient and restart in one batch.

    Returns (images (N,1,28,28), labels (N,), distance (N,), failed (N,) bool).
    """
    n = grads['fc1.bias'].shape[0]
    labels = recover_labels(grads['fc2.bias'], 1)[:, 0]
    a2_target = recover_fc_input(grads['fc1.weight'], grads['fc1.bias'])
    G = grads['fc1.bias'] @ model.fc1.weight  # dL/da2, exact whatever the dropout mask
    W2, W1 = grads['conv2.weight'].flatten(2), grads['conv1.weight'].flatten(2)
    rep = lambda t: t.repeat(restarts, *([1] * (t.dim() - 1)))  # noqa: E731  restart-major
    a2_target, G, W2, W1 = rep(a2_target), rep(G), rep(W2), rep(W1)
    # start black (MNIST's background); restarts beyond the first start from small noise
    x0 = torch.zeros(restarts * n, 1, 28, 28)
    if restarts > 1:
        x0[n:] = 0.1 * torch.rand(x0[n:].shape, generator=generator)
    x = x0.to(G.device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=LR)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(steps * 0.6), int(steps * 0.85)], 0.2)
    diverged = torch.zeros(restarts * n, dtype=torch.bool, device=G.device)
    for _ in tqdm(range(steps), desc='gradient inversion', unit='step', leave=False, disable=not progress):
        d = feature_terms(model, x, a2_target, G, W2, W1)
        bad = ~torch.isfinite(d)
        diverged |= bad
        opt.zero_grad()
        d.masked_fill(bad, 0).sum().backward()
        with torch.no_grad():
            x.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    with torch.enable_grad():
        d = feature_terms(model, x.detach().requires_grad_(True), a2_target, G, W2, W1).detach()
    d = torch.where(diverged | ~torch.isfinite(d), torch.full_like(d, math.inf), d)
    d = d.view(restarts, n)
    best = d.argmin(0)
    images = x.detach().view(restarts, n, 1, 28, 28)[best, torch.arange(n)]
    dist = d[best, torch.arange(n)]
    return images, labels, dist, ~torch.isfinite(dist)


def invert_cosine(model, grads, labels, batch_size, steps, generator, tv_weight=1e-4, progress=True):
    """Geiping et al. 2020 for whole batches: Adam on 1 - cos(dummy gradient, client gradient) + TV.

    grads hold n_batches gradients of batch_size images each; labels (n_batches, batch_size) are the
    recovered ones. All batches are reconstructed together as one tensor computation.
    Returns (images (n_batches*batch_size,1,28,28), distance (n_batches,), failed (n_batches,)).
    """
    target = flat(grads)
    n = target.shape[0] * batch_size
    onehot = F.one_hot(labels.reshape(-1), NUM_CLASSES).float()
    x = (0.1 * torch.rand(n, 1, 28, 28, generator=generator)).to(target.device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(steps * 0.6), int(steps * 0.85)], 0.2)

    def distance(x):
        g = flat(batch_grads(model, x, onehot, batch_size, create_graph=True))
        cos = 1 - F.cosine_similarity(g, target, dim=1, eps=1e-30)
        return cos + tv_weight * tv(x).view(-1, batch_size).sum(1)

    diverged = torch.zeros(target.shape[0], dtype=torch.bool, device=target.device)
    for _ in tqdm(range(steps), desc='gradient inversion (batches)', unit='step', leave=False,
                  disable=not progress):
        d = distance(x)
        bad = ~torch.isfinite(d)
        diverged |= bad
        opt.zero_grad()
        d.masked_fill(bad, 0).sum().backward()
        with torch.no_grad():
            x.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    with torch.enable_grad():
        d = distance(x.detach().requires_grad_(True)).detach()
    failed = diverged | ~torch.isfinite(d)
    return x.detach(), d, failed


def invert(model, grads, method, batch_size, iterations=None, restarts=1, seed=0, progress=True):
    """Attack every intercepted gradient in `grads` ({name: (n_batches, *shape)}).

    Returns images (n_batches*batch_size, 1, 28, 28), recovered labels (n_batches*batch_size,),
    failed (n_batches*batch_size,) bool. Failed means the optimisation produced NaN/inf or its
    gradient distance exploded on every try; such images are black and flagged, never passed off.
    """
    with frozen(model):
        return _invert(model, grads, method, batch_size, iterations, restarts, seed, progress)


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


def _invert(model, grads, method, batch_size, iterations, restarts, seed, progress):
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
                ok = bool(torch.isfinite(x).all() and torch.isfinite(d).all() and d.item() < 1e3)
                if ok:
                    break
            images.append(x.clamp(0, 1) if ok else torch.zeros_like(x))
            labels.append(lab)
            failed.append(not ok)
        return torch.cat(images), torch.cat(labels), torch.tensor(failed)
    if method != 'default':
        raise UserError(f'unknown --gi-method {method!r}: choose dlg, idlg or default')
    if batch_size == 1:
        images, labels, _, failed = invert_default_b1(model, grads, iterations or 400, restarts, generator,
                                                      progress)
        images = torch.where(failed[:, None, None, None], torch.zeros_like(images), images)
        return images, labels, failed
    labels = recover_labels(grads['fc2.bias'], batch_size)
    images, _, failed = invert_cosine(model, grads, labels, batch_size, iterations or 600, generator,
                                      progress=progress)
    failed = failed.repeat_interleave(batch_size)
    images = torch.where(failed[:, None, None, None], torch.zeros_like(images), images)
    return images, labels.reshape(-1), failed


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


def run(target, args, out_dir):
    import os
    started = time.perf_counter()
    method, bs, seed = args.gi_method, args.gi_batch_size, args.seed
    if bs < 1 or args.gi_images < 1:
        raise UserError('--gi-batch-size and --gi-images must be at least 1')
    if args.gi_restarts < 1:
        raise UserError('--gi-restarts must be at least 1')
    model = target.model
    precision = target.history.get('precision', 'fp32') if args.gi_precision == 'train' else 'fp32'
    index, owners = pick_images(target, args.gi_images * bs, seed)
    idx = torch.as_tensor(index, device=target.device)
    originals, true_labels = target.train_x[idx], target.train_y[idx]
    cases = ['off', 'unknown'] if args.gi_dropout == 'both' else [args.gi_dropout]
    results, arrays, rows, titles = {}, {'originals': originals[:, 0].cpu().numpy(),
                                         'true_labels': true_labels.cpu().numpy(), 'indices': index}, [], []
    for case in cases:
        t0 = time.perf_counter()
        grads = client_gradients(model, originals, true_labels, bs, case == 'unknown', precision,
                                 seed=seed + 1)
        recon, labels, failed = invert(model, grads, method, bs, args.gi_iterations, args.gi_restarts, seed)
        seconds = time.perf_counter() - t0
        recon, labels, m = score(originals, recon, true_labels, labels, failed, bs)
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
                'dataset_mean_image_psnr_mean': psnr(mean_image, originals).mean().item()}
    n_show = min(len(originals), 16)
    fig_rows = [[o.cpu().numpy() for o in originals[:n_show, 0]]] + [r[:n_show] for r in rows]
    fig_titles = [[f'label {int(y)}' for y in true_labels[:n_show]]] + [t[:n_show] for t in titles]
    save_image_grid(os.path.join(out_dir, 'gradient_inversion_idlg.png'), fig_rows, fig_titles,
                    row_labels=['original'] + [f'dropout {c}' for c in cases],
                    suptitle=f'gradient inversion ({method}, batch size {bs}): recovered label, PSNR')
    main_case = 'dropout_unknown' if 'unknown' in cases else f'dropout_{cases[0]}'
    main = results[main_case]
    return {
        'method': method,
        'batch_size': bs,
        'images': len(originals),
        'seed': seed,
        'threat_model': {
            'observed': f'one gradient of one training batch of {bs} image(s) per client, under the global model',
            'model_weights': 'known', 'batch_size': 'known', 'labels': 'recovered from the gradient, not given',
            'dropout': {'off': "no dropout active (model in eval mode, the papers' case)",
                        'unknown': 'train mode with a random dropout mask the server does not know'},
            'client_precision': precision,
        },
        **results,
        'baselines': baseline,
        'summary': (f"{main_case}: PSNR {main['psnr_mean']:.1f} dB mean / {main['psnr_min']:.1f} min, "
                    f"labels {100 * main['label_accuracy']:.0f}% (gray guess {baseline['gray_0.5_psnr_mean']:.1f} dB)"),
        'seconds': time.perf_counter() - started,
    }, arrays
