"""GAN-based model inversion (GMI: Zhang et al., "The Secret Revealer", CVPR 2020).

The honest-but-curious server learns a generative prior from data it legitimately holds (never the
clients' training data), then, for every class, searches the generator's latent space for images the
final global model assigns to that class, while the GAN's discriminator keeps them realistic:

    min_z  -D(G(z)) + lambda * L_id(T(G(z)), class),   z clamped to [-1, 1]

L_id is cross-entropy (GMI) or, by default, the negative target logit (Nguyen et al., CVPR 2023: the "logit loss",
stronger because it does not saturate). All classes x restarts are optimised as ONE batch; per class
the restart the target is most confident about is kept (GMI's protocol), and accuracy averaged over
all restarts is reported too (the protocol of later papers).

Public-data protocols (--gmi-public):
  test           the dataset's test split (no client holds it)                       [default]
  classes:5-9    only those classes of the test split; the attack targets the others (class-disjoint)
  fashion-mnist  another dataset's test split (--gmi-public-dir: its IDX folder)     (cross-dataset)
"""
import copy
import hashlib
import math
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from src.client import autocast
from src.data import CHECKSUMS, NUM_CLASSES, load_dataset, to_tensor
from src.plots import save_image_grid
from src.utils import UserError, derive_seed, load_cached, resolve_precision, save_torch, state_digest

Z_DIM = 100
ARCH = 'dcgan28-v2'  # part of the cache key: change it when the networks change


class Generator(nn.Module):
    """z (100) -> FC 128x7x7 -> up 64x14x14 -> up 1x28x28, sigmoid: pixels in [0, 1] like the target's input."""

    def __init__(self, z_dim=Z_DIM):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, 128 * 7 * 7, bias=False), nn.BatchNorm1d(128 * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (128, 7, 7)),
            nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 1, 4, 2, 1), nn.Sigmoid())

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """28x28 -> conv 64 (14x14) -> conv 128 (7x7) -> one logit: "real" is high. No batch norm, so
    D(G(z)) of one latent never depends on the others in the batch (the inversion prior is per image)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(128 * 7 * 7, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


# ---------------------------------------------------------------------------------------------- public data

def parse_classes(text):
    """'5-9' or '5,6,7' or '0-2,7' -> sorted list of class ids."""
    classes = set()
    try:
        for part in text.split(','):
            lo, _, hi = part.partition('-')
            classes.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--gmi-public classes:{text}: use class ids like 'classes:5-9' or 'classes:0,2,4'") from None
    if not classes or min(classes) < 0 or max(classes) >= NUM_CLASSES or len(classes) == NUM_CLASSES:
        raise UserError(f'--gmi-public classes:{text}: name 1 to {NUM_CLASSES - 1} classes within 0-{NUM_CLASSES - 1} '
                        '(the attack targets the classes left out)')
    return sorted(classes)


def public_data(target, spec='test', public_dir=None):
    """(uint8 images the GAN learns from, protocol dict, classes the attack targets) for --gmi-public."""
    data = target.data
    if spec == 'test':
        return data.test_images, {
            'name': 'test', 'description': f'{data.name} test split (held by no client)',
            'num_images': int(len(data.test_images))}, list(range(NUM_CLASSES))
    if spec.startswith('classes:'):
        seen = parse_classes(spec[len('classes:'):])
        keep = np.isin(data.test_labels, seen)
        attacked = [c for c in range(NUM_CLASSES) if c not in seen]
        return data.test_images[keep], {
            'name': 'class-disjoint', 'description': f'{data.name} test split, classes {seen} only; '
                                                     f'attacked classes {attacked} were never shown to the GAN',
            'public_classes': seen, 'num_images': int(keep.sum())}, attacked
    if spec in CHECKSUMS:
        if spec == data.name:
            raise UserError(f"--gmi-public {spec} is the target's own dataset: use 'test' or 'classes:...' instead")
        other = load_dataset(spec, public_dir)
        return other.test_images, {
            'name': 'cross-dataset', 'description': f'{spec} test split (a different dataset from {data.name})',
            'dataset': spec, 'num_images': int(len(other.test_images))}, list(range(NUM_CLASSES))
    raise UserError(f"--gmi-public {spec!r}: use 'test', 'classes:5-9' or another dataset "
                    f"({', '.join(n for n in CHECKSUMS if n != data.name)})")


# ---------------------------------------------------------------------------------------------- GAN training

def train_gan(images, seed, steps, batch_size=64, lr=2e-4, precision='fp32', device='cpu', progress=True,
              log_every=100):
    """DCGAN (non-saturating loss, Adam(0.5, 0.999)) on uint8 images (N, 28, 28) for `steps` batches,
    reshuffling every pass. A step budget (not epochs) keeps training time the same for any public-set size.

    Returns (G, D, history): mean losses and D accuracies over each `log_every` steps. channels_last + bf16
    autocast train ~2x faster than fp32 on AMX CPUs (benchmarks/bench_gan_inversion.py measures it).
    """
    device = torch.device(device)
    torch.manual_seed(derive_seed(seed, 'gmi', 'init'))
    G = Generator().to(device, memory_format=torch.channels_last).train()
    D = Discriminator().to(device, memory_format=torch.channels_last).train()
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    x = to_tensor(images, device).contiguous(memory_format=torch.channels_last)
    n = len(x)
    if n < 2:
        raise UserError(f'the GAN public data has {n} images: need at least 2')
    batch_size = min(batch_size, n)
    gen = torch.Generator().manual_seed(derive_seed(seed, 'gmi', 'data'))
    history = {'step': [], 'd_loss': [], 'g_loss': [], 'd_real_accuracy': [], 'd_fake_accuracy': []}
    sums, count, order, pos = np.zeros(4), 0, None, n
    for step in tqdm(range(1, steps + 1), desc='training GAN prior', unit='step', disable=not progress, leave=False):
        if pos + batch_size > n:  # new pass; drop the ragged tail (batch norm wants full batches)
            order, pos = torch.randperm(n, generator=gen).to(device), 0
        real = x[order[pos:pos + batch_size]]
        pos += batch_size
        z = torch.randn(batch_size, Z_DIM, generator=gen).to(device)
        with autocast(device, precision):
            fake = G(z)
            # real and fake in one pass: D has no batch norm, so this is exactly the two separate passes
            d_real, d_fake = D(torch.cat([real, fake.detach()])).float().split(batch_size)
            # softplus(-x) = -log sigmoid(x): the GAN's binary cross-entropy on logits
            d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        D.requires_grad_(False)  # the generator's step needs gradients through D, not for its weights
        with autocast(device, precision):
            g_loss = F.softplus(-D(fake).float()).mean()  # non-saturating generator loss
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        D.requires_grad_(True)
        sums += [d_loss.item(), g_loss.item(), (d_real > 0).float().mean().item(), (d_fake < 0).float().mean().item()]
        count += 1
        if step % log_every == 0 or step == steps:
            history['step'].append(step)
            for key, value in zip(list(history)[1:], sums / count):
                history[key].append(float(value))
            sums, count = np.zeros(4), 0
    return G.eval(), D.eval(), history


def gan_cache_key(images, seed, steps, batch_size, lr, precision):
    key = {'arch': ARCH, 'z_dim': Z_DIM, 'public_sha256': hashlib.sha256(np.ascontiguousarray(images)).hexdigest(),
           'num_public': int(len(images)), 'seed': int(seed), 'steps': int(steps), 'batch_size': int(batch_size),
           'lr': float(lr), 'precision': precision}
    return key, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_or_train_gan(images, seed, steps, batch_size=64, lr=2e-4, precision='auto', device='cpu',
                      cache_dir='cache', progress=True):
    """(G, D, info): from `cache_dir` when a valid file for exactly this public data, seed and
    hyper-parameters is there; else trained and cached. A cached file that fails to load, holds another
    key or other shapes, or whose weights differ from their recorded digest is retrained, not trusted."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    key, digest = gan_cache_key(images, seed, steps, batch_size, lr, precision)
    path = os.path.join(cache_dir, f'gmi_gan_{digest}.pt')
    def restore(saved):
        if saved['key'] != key:
            raise UserError('it was trained for other data or settings')
        if state_digest(saved['generator'], saved['discriminator']) != saved['weights_sha256']:
            raise UserError('weights do not match their recorded digest')
        G, D = Generator(), Discriminator()
        G.load_state_dict(saved['generator'])
        D.load_state_dict(saved['discriminator'])
        info = {k: saved[k] for k in ('train_seconds', 'history', 'precision')}
        return G.to(device).eval(), D.to(device).eval(), dict(info, cache_path=path, from_cache=True)

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
    # plain contiguous fp32 copies: the trained modules are channels_last
    G, D = Generator(), Discriminator()
    G.load_state_dict(g_state)
    D.load_state_dict(d_state)
    info = {'train_seconds': train_seconds, 'history': history, 'precision': precision}
    return G.to(device).eval(), D.to(device).eval(), dict(info, cache_path=path, from_cache=False)


# ---------------------------------------------------------------------------------------------- latent search

# identity-loss weight: GMI's 100 for cross-entropy; the logit loss is ~10x larger in size, and 10 measured best
# (benchmarks/bench_gan_inversion.py)
DEFAULT_LAMBDA = {'ce': 100.0, 'logit': 10.0}


def identity_loss(logits, classes, kind):
    """Per-sample identity loss: cross-entropy (GMI) or the negative target logit (Nguyen et al. 2023)."""
    if kind == 'ce':
        return F.cross_entropy(logits, classes, reduction='none')
    if kind == 'logit':
        return -logits.gather(1, classes[:, None]).squeeze(1)
    raise UserError(f"--gmi-loss {kind!r}: use 'ce' or 'logit'")


def invert(G, D, model, classes, restarts=5, steps=600, lr=0.002, lam=10.0, loss='logit', seed=0,
           clip=1.0, precision='auto', progress=True, z0=None):
    """GMI latent search for every class in `classes`, `restarts` random starts each, as one batch.

    Each latent's objective depends only on its own image (G and D in eval mode, no batch norm in D), so
    the summed loss gives every latent exactly its own gradient. SGD with Nesterov momentum 0.9 and z
    clamped to [-clip, clip] after every step, as GMI's code does. The search runs on channels_last
    copies of the networks under bf16 autocast where the hardware has it (~2x faster on AMX CPUs,
    benchmarks/bench_gan_inversion.py); the returned confidences are computed in fp32.
    Returns images (C, R, 1, 28, 28), the target's softmax confidence for the class (C, R), z (C, R, Z) and
    the confidence's logarithm (C, R), which still ranks restarts whose confidences all round to 1.
    """
    device = next(G.parameters()).device
    precision = resolve_precision(precision, device)
    classes = torch.as_tensor(classes, dtype=torch.long)
    n_classes = len(classes)
    target = classes.repeat_interleave(restarts).to(device)
    if z0 is None:  # GMI draws z ~ N(0, I) and clamps it
        z0 = torch.randn(n_classes * restarts, Z_DIM, generator=torch.Generator().manual_seed(
            derive_seed(seed, 'gmi', 'latents')))
    z = z0.clone().clamp_(-clip, clip).to(device).requires_grad_()
    # frozen channels_last copies: the caller's modules (the target model above all) stay untouched
    G_, D_, T_ = (copy.deepcopy(m).eval().requires_grad_(False).to(memory_format=torch.channels_last)
                  for m in (G, D, model))
    opt = torch.optim.SGD([z], lr=lr, momentum=0.9, nesterov=True)
    bar = tqdm(range(steps), desc=f'GMI latent search ({n_classes} classes x {restarts} restarts)',
               unit='step', disable=not progress, leave=False)
    failed = torch.zeros(len(target), dtype=torch.bool, device=device)
    for step in bar:
        with autocast(device, precision):
            fake = G_(z).contiguous(memory_format=torch.channels_last)
            prior = -D_(fake).float()
            iden = identity_loss(T_(fake).float(), target, loss)
        objective = (prior.reshape(-1) + lam * iden.reshape(-1))
        bad = ~torch.isfinite(objective)  # a diverged latent must not poison the others' steps
        failed |= bad
        opt.zero_grad(set_to_none=True)
        objective.masked_fill(bad, 0).sum().backward()
        z.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        with torch.no_grad():
            z.clamp_(-clip, clip)
        if step % 50 == 0:
            bar.set_postfix(prior=f'{prior.mean().item():.2f}', identity=f'{iden.mean().item():.3f}', refresh=False)
    with torch.no_grad():
        images = G(z)
        # log-probabilities: confidences of 1 - 1e-9 all round to 1.0 but must still rank the restarts
        log_conf = model(images).log_softmax(1).gather(1, target[:, None]).squeeze(1)
    # a diverged latent is reported as failed (confidence 0, black image), never picked as best
    failed |= ~torch.isfinite(log_conf) | ~torch.isfinite(images).flatten(1).all(1)
    images = images.masked_fill(failed[:, None, None, None], 0)
    log_conf = log_conf.masked_fill(failed, -math.inf)
    return (images.reshape(n_classes, restarts, 1, 28, 28), log_conf.exp().reshape(n_classes, restarts),
            z.detach().reshape(n_classes, restarts, Z_DIM), log_conf.reshape(n_classes, restarts))


# ---------------------------------------------------------------------------------------------- the attack

def add_arguments(parser):
    g = parser.add_argument_group('gan_inversion', 'GAN-based model inversion (GMI, Zhang et al. 2020)')
    g.add_argument('--gmi-public', default='test',
                   help="the server's own data for the GAN prior: 'test' (test split, default), 'classes:5-9' "
                        "(class-disjoint: only those classes; the others are attacked) or another dataset "
                        "('fashion-mnist' / 'mnist', its test split)")
    g.add_argument('--gmi-public-dir', default=None, help='IDX folder of the other dataset for --gmi-public <dataset>')
    g.add_argument('--gmi-gan-steps', type=int, default=3000, help='GAN training steps (batches)')
    g.add_argument('--gmi-batch-size', type=int, default=64)
    g.add_argument('--gmi-gan-lr', type=float, default=2e-4)
    g.add_argument('--gmi-precision', default='auto', choices=['auto', 'bf16', 'fp32'],
                   help='GAN training precision (auto: bf16 autocast where the hardware has it)')
    g.add_argument('--gmi-restarts', type=int, default=5, help='random latent starts per class')
    g.add_argument('--gmi-steps', type=int, default=600, help='latent-search steps')
    g.add_argument('--gmi-lr', type=float, default=0.002,
                   help='latent-search learning rate (SGD, Nesterov 0.9; per latent, on the summed loss)')
    g.add_argument('--gmi-lambda', type=float, default=None,
                   help='weight of the identity loss against the prior (default: 100 for ce as in GMI, 10 for logit, '
                        'whose values are larger)')
    g.add_argument('--gmi-loss', default='logit', choices=['ce', 'logit'],
                   help="identity loss: 'logit' (negative target logit, Nguyen et al. 2023; default, stronger) or "
                        "'ce' (cross-entropy, GMI's original, which saturates once the target is sure)")


def check_args(args):
    for name in ('gmi_gan_steps', 'gmi_batch_size', 'gmi_restarts', 'gmi_steps'):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ('gmi_gan_lr', 'gmi_lr'):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.gmi_lambda is not None and args.gmi_lambda < 0:
        raise UserError('--gmi-lambda must be >= 0')


def summarise(per_image, mask, target_confidence):
    """Means over the selected images of the evaluation classifier's scores (JSON-able)."""
    pred, cls = np.asarray(per_image['eval_prediction'])[mask], np.asarray(per_image['target_class'])[mask]
    mean = lambda k: float(np.nanmean(np.asarray(per_image[k], dtype=float)[mask]))  # noqa: E731 (None -> nan)
    return {'attack_accuracy': float((pred == cls).mean()), 'eval_confidence': mean('eval_confidence'),
            'knn_feature_distance': mean('knn_feature_distance'), 'knn_pixel_distance': mean('knn_pixel_distance'),
            'target_confidence': float(np.asarray(target_confidence)[mask].mean()), 'count': int(mask.sum())}


def run(target, args, out_dir):
    from src.evaluation import load_or_train_eval_classifier, private_data, score_inversions
    check_args(args)
    started = time.perf_counter()
    device, seed, R = target.device, args.seed, args.gmi_restarts
    lam = DEFAULT_LAMBDA[args.gmi_loss] if args.gmi_lambda is None else args.gmi_lambda
    cache_dir = getattr(args, 'cache_dir', 'cache')
    images, protocol, attacked = public_data(target, args.gmi_public, args.gmi_public_dir)
    tqdm.write(f"GMI: generative prior learned from {protocol['description']} ({protocol['num_images']} images)")

    G, D, gan = load_or_train_gan(images, seed, args.gmi_gan_steps, args.gmi_batch_size, args.gmi_gan_lr,
                                  args.gmi_precision, device, cache_dir)
    tqdm.write(f"GMI: GAN {'loaded from ' + gan['cache_path'] if gan['from_cache'] else 'trained'} "
               f"(training took {gan['train_seconds']:.0f} s)")
    with torch.no_grad():
        z = torch.randn(40, Z_DIM, generator=torch.Generator().manual_seed(derive_seed(seed, 'gmi', 'samples')))
        samples = G(z.to(device)).cpu().numpy()[:, 0]
    save_image_grid(os.path.join(out_dir, 'gan_samples.png'), [list(samples[r * 10:(r + 1) * 10]) for r in range(4)],
                    suptitle=f"GAN prior, unconditioned samples ({protocol['description']})")

    classes = list(range(NUM_CLASSES))  # invert every class; the headline numbers cover the attacked ones
    t0 = time.perf_counter()
    inv, conf, _, log_conf = invert(G, D, target.model, classes, R, args.gmi_steps, args.gmi_lr, lam,
                                    args.gmi_loss, seed)
    inversion_seconds = time.perf_counter() - t0

    eval_model, eval_info = load_or_train_eval_classifier(target.data, seed, cache_dir, device)
    px, py = private_data(target)
    score = score_inversions(eval_model, inv.reshape(-1, 1, 28, 28), np.repeat(classes, R), px, py)['per_image']
    best = log_conf.argmax(1).cpu().numpy()  # GMI: per class, the restart the TARGET is most confident about
    is_best = np.zeros((NUM_CLASSES, R), bool)
    is_best[classes, best] = True
    is_best = is_best.ravel()
    is_attacked = np.isin(np.repeat(classes, R), attacked)
    target_conf = conf.cpu().numpy().ravel()
    overall = {
        'best_restart': dict(summarise(score, is_best & is_attacked, target_conf),
                             protocol="GMI's: per class, the restart the target model is most confident about"),
        'all_restarts': dict(summarise(score, is_attacked, target_conf),
                             protocol='later papers\': every restart of every attacked class, averaged')}
    if len(attacked) < NUM_CLASSES:  # class-disjoint: the classes the GAN saw, for contrast
        overall['public_classes_best_restart'] = summarise(score, is_best & ~is_attacked, target_conf)
    per_class = {str(c): dict({k: score[k][c * R + best[c]] for k in
                               ('eval_prediction', 'eval_confidence', 'knn_feature_distance', 'knn_pixel_distance')},
                              target_confidence=float(conf[c, best[c]]), best_restart_index=int(best[c]),
                              attack_accuracy_all_restarts=float(np.mean(
                                  np.asarray(score['eval_prediction'][c * R:(c + 1) * R]) == c)),
                              attacked=c in attacked)
                 for c in classes}
    b, a = overall['best_restart'], overall['all_restarts']
    metrics = {
        'summary': (f"evaluation-classifier attack accuracy {b['attack_accuracy']:.3f} (best restart per class), "
                    f"{a['attack_accuracy']:.3f} (all {R} restarts); KNN distance to private images "
                    f"{b['knn_feature_distance']:.2f} (eval features) / {b['knn_pixel_distance']:.2f} (pixels); "
                    f"prior: {protocol['name']}"),
        'attack_accuracy': b['attack_accuracy'], 'attack_accuracy_all_restarts': a['attack_accuracy'],
        'eval_confidence': b['eval_confidence'], 'knn_feature_distance': b['knn_feature_distance'],
        'knn_pixel_distance': b['knn_pixel_distance'],
        'public_data': protocol, 'attacked_classes': attacked,
        'overall': overall, 'per_class': per_class,
        'gan_train_seconds': gan['train_seconds'], 'gan_from_cache': gan['from_cache'],
        'inversion_seconds': inversion_seconds,
        'n_failed': int(torch.isinf(log_conf).sum()),  # diverged latents (none is used as a result)
        'gan': {'cache_path': gan['cache_path'], 'precision': gan['precision'], 'steps': args.gmi_gan_steps,
                'batch_size': args.gmi_batch_size, 'lr': args.gmi_gan_lr, 'loss': 'DCGAN non-saturating',
                'final_d_loss': gan['history']['d_loss'][-1], 'final_g_loss': gan['history']['g_loss'][-1]},
        'settings': {'identity_loss': args.gmi_loss, 'restarts': R, 'steps': args.gmi_steps, 'lr': args.gmi_lr,
                     'lambda': lam, 'optimizer': 'SGD, Nesterov momentum 0.9', 'z_range': [-1, 1]},
        'eval_classifier': {k: eval_info[k] for k in ('test_accuracy', 'from_cache', 'cache_path')},
        'seed': seed,
        'seconds': None,
        'threat_model': {
            'attacker': 'honest-but-curious server',
            'knows': 'white-box final global model, and its own public data for the GAN prior: '
                     + protocol['description'],
            'does_not_know': "any client's training data or updates",
            'scoring_only': "the clients' private training images (KNN distance) and an independent "
                            'evaluation classifier trained centrally on the training split'},
    }

    titles = [[f"{c}{'' if c in attacked else ' (public)'}\neval: {score['eval_prediction'][c * R + best[c]]} "
               f"({score['eval_confidence'][c * R + best[c]]:.2f})" for c in classes]]
    best_images = inv[torch.arange(NUM_CLASSES), torch.from_numpy(best)].cpu().numpy()[:, 0]
    save_image_grid(os.path.join(out_dir, 'gan_inversion_all.png'), [list(best_images)], titles,
                    suptitle=f"GMI ({args.gmi_loss} identity loss, prior: {protocol['name']}), best of {R} restarts "
                             f"by target confidence; label: evaluation classifier's prediction (its confidence for "
                             f"the target class)")
    metrics['seconds'] = time.perf_counter() - started
    arrays = {'best_images': best_images.astype(np.float32),                                  # (10, 28, 28)
              'all_restarts': inv.cpu().numpy()[:, :, 0].astype(np.float32),                  # (10, R, 28, 28)
              'target_confidence_all': conf.cpu().numpy().astype(np.float32),                 # (10, R)
              'eval_predictions_all': np.asarray(score['eval_prediction'], np.int64).reshape(NUM_CLASSES, R),
              'gan_samples': samples.astype(np.float32)}                                      # (40, 28, 28)
    return metrics, arrays
