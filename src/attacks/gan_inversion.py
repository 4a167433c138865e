"""GAN-based model inversion (GMI: Zhang et al., "The Secret Revealer", CVPR 2020).

The honest-but-curious server learns a generative prior (src/attacks/gan_prior.py) from data it legitimately
holds (never the clients' training data), then, for every class, searches the generator's latent space for
images the final global model assigns to that class, while the GAN's discriminator keeps them realistic:

    min_z  -D(G(z)) + lambda * L_id(T(G(z)), class),   z clamped to [-1, 1]

L_id is cross-entropy (GMI) or, by default, the negative target logit (Nguyen et al., CVPR 2023: the "logit
loss", stronger because it does not saturate). All classes x restarts are optimised as ONE batch; per class
the restart the target is most confident about is kept (GMI's protocol), and accuracy averaged over all
restarts is reported too (the protocol of later papers).

Latent search (--gmi-search):
  default    this repository's: logit loss, lambda 10, lr 0.002 per latent, 600 steps
  published  GMI's code (AI-secure/GMI-Attack, attack.py): cross-entropy, lambda 100, lr 0.02 on the loss
             averaged over one latent per attacked class, 1,500 iterations

Public-data protocols (--gmi-public), all from the server's own data:
  test           the dataset's test split (no client holds it)                       [default]
  classes:5-9    only those classes of the test split; the attack targets the others (class-disjoint)
  fashion-mnist  another dataset's test split (--gmi-public-dir: its IDX folder)     (cross-dataset)
Besides the chosen prior, a second GAN learns from classes 5-9 only and attacks 0-4 (--gmi-class-disjoint,
on by default): the protocol GMI's papers use for MNIST, where the prior cannot simply hold the answer.
Every result stands beside its no-attack baseline: the mean public image of each attacked class.
"""
import argparse
import copy
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from src.attacks.base import Attack, Report
from src.attacks.common import best_restart, class_halves, descend, identity_loss
from src.attacks.gan_prior import Z_DIM, load_or_train_gan
from src.data import CHECKSUMS, load_dataset, to_tensor
from src.plots import as_pixels, save_image_grid
from src.utils import UserError, autocast, derive_seed, resolve_precision


def class_disjoint(num_classes):
    """GMI's MNIST split, 'classes:5-9' for 10 classes: the prior sees the upper half, the attack targets the rest."""
    public = class_halves(num_classes)[1]
    return f'classes:{public[0]}-{public[-1]}'


# identity-loss weight: GMI's 100 for cross-entropy; the logit loss is ~10x larger in size, and 10 measured
# best (benchmarks/bench_gan_inversion.py)
DEFAULT_LAMBDA = {'ce': 100.0, 'logit': 10.0}
SEARCHES = {
    'default': {'lr': 0.002, 'steps': 600, 'loss': 'logit', 'lambda': None, 'reduction': 'sum', 'clamp_start': True},
    # GMI's inversion(): lr=2e-2, lamda=100, iter_times=1500, nn.CrossEntropyLoss and -D(fake).mean(), both
    # averaged over a batch of one latent per identity, z ~ N(0, I) clamped only after each step
    'published': {'lr': 0.02, 'steps': 1500, 'loss': 'ce', 'lambda': 100.0, 'reduction': 'mean', 'clamp_start': False},
}
SEARCH_FLAGS = {'lr': 'gmi_lr', 'steps': 'gmi_steps', 'loss': 'gmi_loss', 'lambda': 'gmi_lambda'}


# ---------------------------------------------------------------------------------------------- settings

def search_settings(settings):
    """The latent search's values: the named --gmi-search, with explicit flags overriding 'default' only."""
    name = getattr(settings, 'gmi_search', 'default')
    s = dict(SEARCHES[name], search=name)
    if name == 'default':
        s.update({k: getattr(settings, flag) for k, flag in SEARCH_FLAGS.items()
                  if getattr(settings, flag, None) is not None})
    if s['lambda'] is None:
        s['lambda'] = DEFAULT_LAMBDA[s['loss']]
    return s


def parse_classes(text, num_classes=None):
    """'5-9' or '5,6,7' or '0-2,7' -> sorted list of class ids (checked against num_classes when given)."""
    classes = set()
    try:
        for part in text.split(','):
            lo, _, hi = part.partition('-')
            classes.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--gmi-public classes:{text}: use class ids like 'classes:5-9' or 'classes:0,2,4'") from None
    if not classes or min(classes) < 0:
        raise UserError(f'--gmi-public classes:{text}: name class ids 0 and up')
    k = num_classes
    if k is not None and (max(classes) >= k or len(classes) == k):
        raise UserError(f'--gmi-public classes:{text}: name 1 to {k - 1} classes within 0-{k - 1} '
                        '(the attack targets the classes left out)')
    return sorted(classes)


def public_data(view, spec='test', public_dir=None):
    """The GAN's public data for --gmi-public: {'images': uint8 (N, H, W) or (N, C, H, W), 'labels': (N,) or None
    where they name no class of the target's, 'protocol': dict, 'attacked': classes the attack targets}."""
    # uint8, as the cache key hashes it: the view's pixels are bytes / 255, so this is exact
    x = view.public_x[:, 0] if view.public_x.shape[1] == 1 else view.public_x
    images = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    labels = view.public_y.cpu().numpy()
    every = list(range(view.spec.num_classes))
    if spec == 'test':
        return {'images': images, 'labels': labels, 'attacked': every, 'protocol': {
            'name': 'test', 'description': f'{view.dataset} test split (held by no client)',
            'num_images': int(len(images))}}
    if spec.startswith('classes:'):
        seen = parse_classes(spec[len('classes:'):], view.spec.num_classes)
        keep = np.isin(labels, seen)
        attacked = [c for c in every if c not in seen]
        return {'images': images[keep], 'labels': labels[keep], 'attacked': attacked, 'protocol': {
            'name': 'class-disjoint', 'description': f'{view.dataset} test split, classes {seen} only; '
                                                     f'attacked classes {attacked} were never shown to the GAN',
            'public_classes': seen, 'num_images': int(keep.sum())}}
    if spec in CHECKSUMS:
        if spec == view.dataset:
            raise UserError(f"--gmi-public {spec} is the target's own dataset: use 'test' or 'classes:...' instead")
        other = load_dataset(spec, public_dir)
        if other.spec.shape != view.spec.shape:
            raise UserError(f"--gmi-public {spec}: its images are {other.spec.shape}, the target's {view.spec.shape}")
        return {'images': other.test_images, 'labels': None, 'attacked': every, 'protocol': {
            'name': 'cross-dataset', 'description': f'{spec} test split (a different dataset from {view.dataset})',
            'dataset': spec, 'num_images': int(len(other.test_images))}}
    raise UserError(f"--gmi-public {spec!r}: use 'test', 'classes:5-9' or another dataset "
                    f"({', '.join(n for n in CHECKSUMS if n != view.dataset)})")


# ---------------------------------------------------------------------------------------------- latent search

def invert(G, D, model, classes, restarts=5, steps=600, lr=0.002, lam=10.0, loss='logit', seed=0, clip=1.0,
           precision='auto', progress=True, z0=None, loss_scale=1.0, clamp_start=True):
    """GMI latent search for every class in `classes`, `restarts` random starts each, as one batch.

    Each latent's objective depends only on its own image (G and D in eval mode, no batch norm in D), so
    common.descend's summed loss gives every latent exactly its own gradient, times loss_scale (GMI averages
    over a batch of one latent per attacked class: loss_scale 1 / that number reproduces its steps). SGD with
    Nesterov momentum 0.9, z clamped to [-clip, clip] after every step, as GMI's code does; clamp_start also
    clamps the start. The search runs on channels_last copies of the networks under bf16 autocast where the
    hardware has it (~2x faster on AMX CPUs); the returned confidences are computed in fp32.
    Returns images (C, R, *image shape), the target's softmax confidence for the class (C, R), z (C, R, Z) and
    the confidence's logarithm (C, R), which still ranks restarts whose confidences all round to 1; a latent
    that diverged has a black image and log-confidence -inf, so it is never picked.
    """
    device = next(G.parameters()).device
    precision = resolve_precision(precision, device)
    classes = torch.as_tensor(classes, dtype=torch.long)
    n_classes = len(classes)
    target = classes.repeat_interleave(restarts).to(device)
    if z0 is None:  # GMI draws z ~ N(0, I)
        z0 = torch.randn(n_classes * restarts, Z_DIM, generator=torch.Generator().manual_seed(
            derive_seed(seed, 'gmi', 'latents')))
    z0 = z0.to(device).clamp(-clip, clip) if clamp_start else z0.to(device)
    # frozen channels_last copies: the caller's modules (the target model above all) stay untouched
    G_, D_, T_ = (copy.deepcopy(m).eval().requires_grad_(False).to(memory_format=torch.channels_last)
                  for m in (G, D, model))

    def objective(z, step):
        with autocast(device, precision):
            fake = G_(z).contiguous(memory_format=torch.channels_last)
            prior = -D_(fake).float()
            iden = identity_loss(T_(fake).float(), target, loss)
        return loss_scale * (prior + lam * iden)

    z, failed = descend(z0, objective, steps, lr, optimizer='sgd-nesterov', bounds=(-clip, clip),
                        progress=f'GMI latent search ({n_classes} classes x {restarts} restarts)' if progress else None)
    with torch.no_grad():
        images = G(z)
        # log-probabilities: confidences of 1 - 1e-9 all round to 1.0 but must still rank the restarts
        log_conf = model(images).float().log_softmax(1).gather(1, target[:, None]).squeeze(1)
    failed |= ~torch.isfinite(log_conf) | ~torch.isfinite(images).flatten(1).all(1)
    images = images.masked_fill(failed[:, None, None, None], 0)
    log_conf = log_conf.masked_fill(failed, -math.inf)
    return (images.reshape(n_classes, restarts, *images.shape[1:]), log_conf.exp().reshape(n_classes, restarts),
            z.reshape(n_classes, restarts, Z_DIM), log_conf.reshape(n_classes, restarts))


# ---------------------------------------------------------------------------------------------- the attack

class GanInversion(Attack):
    name = 'gan'
    key = 'gan_inversion'
    title = 'GAN-based model inversion (GMI, Zhang et al. 2020)'
    figures = ('gan_inversion_all.png', 'gan_samples.png')
    headline = (('attack_accuracy', 'attack accuracy (best restart)', 'fraction'),
                ('attack_accuracy_all_restarts', 'attack accuracy (all restarts)', 'fraction'),
                ('no_attack_baseline.attack_accuracy', 'no attack: public class means', 'fraction'),
                ('class_disjoint.best_restart.attack_accuracy', 'class-disjoint: attack accuracy, classes 0-4',
                 'fraction'),
                ('class_disjoint.no_attack_baseline.attack_accuracy', 'class-disjoint: no attack', 'fraction'),
                ('knn_feature_distance', 'KNN feature distance', 'number'))

    def add_arguments(self, parser):
        g = parser.add_argument_group('gan_inversion', self.title)
        g.add_argument('--gmi-public', default='test',
                       help="the server's own data for the GAN prior: 'test' (test split, default), 'classes:5-9' "
                            "(class-disjoint: only those classes; the others are attacked) or another dataset "
                            "('fashion-mnist' / 'mnist', its test split)")
        g.add_argument('--gmi-public-dir', default=None,
                       help='IDX folder of the other dataset for --gmi-public <dataset>')
        g.add_argument('--gmi-class-disjoint', action=argparse.BooleanOptionalAction, default=True,
                       help="also attack classes 0-4 with a second GAN that learns from public classes 5-9 only "
                            "(GMI's MNIST protocol; with --gmi-public classes:... that run is reused)")
        g.add_argument('--gmi-gan-steps', type=int, default=3000, help='GAN training steps (batches)')
        g.add_argument('--gmi-batch-size', type=int, default=64)
        g.add_argument('--gmi-gan-lr', type=float, default=2e-4)
        g.add_argument('--gmi-precision', default='auto', choices=['auto', 'bf16', 'fp32'],
                       help='GAN training and latent-search precision (auto: bf16 autocast where the hardware has it)')
        g.add_argument('--gmi-restarts', type=int, default=5, help='random latent starts per class')
        g.add_argument('--gmi-search', default='default', choices=list(SEARCHES),
                       help="latent search: 'default' (logit loss, lambda 10, lr 0.002 per latent, 600 steps) or "
                            "'published' (GMI's code: cross-entropy, lambda 100, lr 0.02 on the loss averaged over "
                            "the attacked classes, 1,500 steps; it fixes the four flags below)")
        g.add_argument('--gmi-steps', type=int, default=None, help='latent-search steps (default 600)')
        g.add_argument('--gmi-lr', type=float, default=None,
                       help='latent-search learning rate (SGD, Nesterov 0.9; per latent, on the summed loss; '
                            'default 0.002)')
        g.add_argument('--gmi-lambda', type=float, default=None,
                       help='weight of the identity loss against the prior (default: 100 for ce, 10 for logit, '
                            'whose values are larger)')
        g.add_argument('--gmi-loss', default=None, choices=['ce', 'logit'],
                       help="identity loss: 'logit' (negative target logit, Nguyen et al. 2023; default, stronger) "
                            "or 'ce' (cross-entropy, GMI's, which saturates once the target is sure)")

    def check(self, settings):
        if getattr(settings, 'gmi_search', 'default') == 'published':
            given = [f"--{flag.replace('_', '-')}" for flag in SEARCH_FLAGS.values()
                     if getattr(settings, flag, None) is not None]
            if given:
                raise UserError(f"--gmi-search published fixes GMI's lr 0.02, 1500 steps, lambda 100 and the ce "
                                f"loss: drop {', '.join(given)} or use --gmi-search default")
        for name in ('gmi_gan_steps', 'gmi_batch_size', 'gmi_restarts', 'gmi_steps'):
            if getattr(settings, name, None) is not None and getattr(settings, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ('gmi_gan_lr', 'gmi_lr'):
            if getattr(settings, name, None) is not None and not getattr(settings, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if getattr(settings, 'gmi_lambda', None) is not None and not settings.gmi_lambda >= 0:
            raise UserError('--gmi-lambda must be >= 0')
        spec = settings.gmi_public
        if spec.startswith('classes:'):
            parse_classes(spec[len('classes:'):])
        elif spec != 'test' and spec not in CHECKSUMS:
            raise UserError(f"--gmi-public {spec!r}: use 'test', 'classes:5-9' or another dataset "
                            f"({', '.join(CHECKSUMS)})")

    def check_data(self, settings, view):
        if settings.gmi_public.startswith('classes:'):  # now that the number of classes is known
            parse_classes(settings.gmi_public[len('classes:'):], view.spec.num_classes)

    def run(self, view, settings):
        """Both GANs and their latent searches, from the server's view alone (its model and public data)."""
        self.check(settings)
        search = search_settings(settings)
        spec = settings.gmi_public
        main = self._attack(view, settings, search, public_data(view, spec, settings.gmi_public_dir))
        disjoint = None
        if getattr(settings, 'gmi_class_disjoint', True):
            # the chosen prior is class-disjoint already: the same GAN and latents would repeat that run
            disjoint = 'main' if spec.startswith('classes:') else self._attack(
                view, settings, search, public_data(view, class_disjoint(view.spec.num_classes)))
        return {'search': search, 'main': main, 'class_disjoint': disjoint}

    def _attack(self, view, settings, search, public):
        """One GAN prior (trained or cached) and the latent search of all classes x restarts with it."""
        device, seed, R = view.device, settings.seed, settings.gmi_restarts
        tqdm.write(f"GMI: generative prior learned from {public['protocol']['description']} "
                   f"({public['protocol']['num_images']} images)")
        G, D, gan = load_or_train_gan(public['images'], seed, settings.gmi_gan_steps, settings.gmi_batch_size,
                                      settings.gmi_gan_lr, settings.gmi_precision, device, view.cache_dir)
        tqdm.write(f"GMI: GAN {'loaded from ' + gan['cache_path'] if gan['from_cache'] else 'trained'} "
                   f"(training took {gan['train_seconds']:.0f} s)")
        with torch.no_grad():
            z = torch.randn(40, Z_DIM, generator=torch.Generator().manual_seed(derive_seed(seed, 'gmi', 'samples')))
            samples = as_pixels(G(z.to(device)))
        classes = list(range(view.spec.num_classes))  # invert every class; the headline numbers cover the attacked ones
        t0 = time.perf_counter()
        images, conf, _, log_conf = invert(
            G, D, view.model, classes, R, search['steps'], search['lr'], search['lambda'], search['loss'], seed,
            precision=settings.gmi_precision, clamp_start=search['clamp_start'],
            loss_scale=1 / len(public['attacked']) if search['reduction'] == 'mean' else 1.0)
        return {'public': public, 'attacked': public['attacked'], 'protocol': public['protocol'], 'gan': gan,
                'samples': samples, 'classes': classes, 'images': images, 'conf': conf, 'log_conf': log_conf,
                'inversion_seconds': time.perf_counter() - t0}

    def score(self, result, private, truth, view, settings, out_dir):
        """Both evaluators judge every inversion and its no-attack baseline against the clients' data."""
        from src.evaluation import load_evaluators  # scoring only: run() must work without the evaluators
        evaluators = load_evaluators(private.dataset, settings.seed, view.cache_dir, view.device)
        px, py = private.clients()
        main, search, R = result['main'], result['search'], settings.gmi_restarts
        s = score_run(main, evaluators, px, py, view.model)
        cd = result['class_disjoint']
        d = s if cd == 'main' else score_run(cd, evaluators, px, py, view.model) if cd else None
        b, a, n = s['overall']['best_restart'], s['overall']['all_restarts'], s['baseline']
        disjoint = disjoint_metrics(cd if cd != 'main' else main, d, reused=cd == 'main')
        disjoint_text = '' if d is None else (
            f"; class-disjoint (GAN saw {_span(disjoint['public_classes'])}, attacks "
            f"{_span(disjoint['attacked_classes'])}): {disjoint['best_restart']['attack_accuracy']:.3f} vs "
            f"{disjoint['no_attack_baseline']['attack_accuracy']:.3f} with no attack")
        metrics = {
            'summary': (f"attack accuracy {b['attack_accuracy']:.3f} (best restart per class), "
                        f"{a['attack_accuracy']:.3f} (all {R} restarts), both evaluators agreeing, vs "
                        f"{n['attack_accuracy']:.3f} with no attack (public class means){disjoint_text}; KNN distance "
                        f"to private images {_fmt(b['knn_feature_distance'])} (features) / "
                        f"{_fmt(b['knn_pixel_distance'])} (pixels); prior: {main['protocol']['name']}; "
                        f"search: {search['search']}"),
            'attack_accuracy': b['attack_accuracy'], 'attack_accuracy_all_restarts': a['attack_accuracy'],
            'eval_confidence': b['eval_confidence'], 'knn_feature_distance': b['knn_feature_distance'],
            'knn_pixel_distance': b['knn_pixel_distance'],
            'no_attack_baseline': n, 'class_disjoint': disjoint,
            'public_data': main['protocol'], 'attacked_classes': main['attacked'],
            'overall': s['overall'], 'per_class': s['per_class'],
            'gan_train_seconds': main['gan']['train_seconds'], 'gan_from_cache': main['gan']['from_cache'],
            'inversion_seconds': main['inversion_seconds'],
            'n_failed': int(torch.isinf(main['log_conf']).sum()),  # diverged latents (none is used as a result)
            'gan': {'cache_path': main['gan']['cache_path'], 'precision': main['gan']['precision'],
                    'steps': settings.gmi_gan_steps, 'batch_size': settings.gmi_batch_size, 'lr': settings.gmi_gan_lr,
                    'loss': 'DCGAN non-saturating', 'final_d_loss': main['gan']['history']['d_loss'][-1],
                    'final_g_loss': main['gan']['history']['g_loss'][-1]},
            'settings': {'search': search['search'], 'identity_loss': search['loss'], 'restarts': R,
                         'steps': search['steps'], 'lr': search['lr'], 'lambda': search['lambda'],
                         'loss_reduction': ('sum over latents' if search['reduction'] == 'sum' else
                                            'mean over one latent per attacked class (GMI)'),
                         'optimizer': 'SGD, Nesterov momentum 0.9', 'z_range': [-1, 1],
                         'z_start': 'N(0, I), clamped' if search['clamp_start'] else 'N(0, I)',
                         'precision': resolve_precision(settings.gmi_precision, view.device),
                         'best_restart_by': "the target model's log-confidence",
                         'class_disjoint': bool(cd)},
            'evaluators': evaluators.info,
            'eval_classifier': {k: evaluators.info['primary'].get(k) for k in ('test_accuracy', 'from_cache',
                                                                               'cache_path')},
            'seed': settings.seed,
            'threat_model': {
                'attacker': 'honest-but-curious server',
                'knows': 'white-box final global model, and its own public data for the GAN prior: '
                         + main['protocol']['description'] + (
                             f"; for the class-disjoint protocol {cd['protocol']['description']}"
                             if isinstance(cd, dict) else ''),
                'does_not_know': "any client's training data or updates",
                'scoring_only': "the clients' private training images (KNN distance) and two independent "
                                'evaluation classifiers of different families, trained centrally on the training '
                                'split'},
        }
        write_figures(out_dir, main, s, cd if isinstance(cd, dict) else None, d if isinstance(cd, dict) else None,
                      search)
        arrays = {'best_images': s['best_images'],                                                # (classes, H, W[, 3])
                  'all_restarts': as_pixels(main['images']),                                   # (classes, R, H, W[, 3])
                  'target_confidence_all': main['conf'].cpu().numpy().astype(np.float32),          # (10, R)
                  'eval_predictions_all': s['predictions'][0], 'second_predictions_all': s['predictions'][1],
                  'no_attack_baseline': s['baseline_images'],                                      # (attacked, 28, 28)
                  'gan_samples': main['samples'].astype(np.float32)}                               # (40, 28, 28)
        if isinstance(cd, dict):
            arrays.update(class_disjoint_best_images=d['best_images'],
                          class_disjoint_no_attack_baseline=d['baseline_images'])
        return Report(metrics, arrays)


# ---------------------------------------------------------------------------------------------- scoring

PER_IMAGE = ('eval_prediction', 'eval_confidence', 'second_prediction', 'second_confidence', 'correct',
             'knn_feature_distance', 'knn_pixel_distance')


def _plain(v):
    return v.item() if hasattr(v, 'item') else v  # numpy scalars -> JSON-able Python values


def _fmt(v, spec='.2f'):
    return 'n/a' if v is None else format(v, spec)


def _span(classes):
    return f'{classes[0]}-{classes[-1]}' if classes == list(range(classes[0], classes[-1] + 1)) else str(classes)


def score_run(run, evaluators, px, py, model):
    """One GAN's inversions and their no-attack baseline, scored alike by evaluation.score_inversions and
    summarise: the headline covers the attacked classes; the best restart is the target's choice."""
    from src.evaluation import class_mean_images, score_inversions, summarise
    classes, attacked = run['classes'], run['attacked']
    C, R = run['images'].shape[:2]
    flat = np.repeat(classes, R)
    per_image = score_inversions(evaluators, run['images'].flatten(0, 1), flat, px, py)['per_image']
    best = best_restart(run['log_conf'].cpu()).numpy()
    is_best = np.zeros((C, R), bool)
    is_best[np.arange(C), best] = True
    is_best, is_attacked = is_best.ravel(), np.isin(flat, attacked)
    conf = run['conf'].cpu().numpy().ravel()
    overall = {
        'best_restart': dict(summarise(per_image, is_best & is_attacked, conf),
                             protocol="GMI's: per class, the restart the target model is most confident about"),
        'all_restarts': dict(summarise(per_image, is_attacked, conf),
                             protocol="later papers': every restart of every attacked class, averaged")}
    if len(attacked) < C:  # class-disjoint: the classes the GAN saw, for contrast
        overall['public_classes_best_restart'] = summarise(per_image, is_best & ~is_attacked, conf)
    correct = np.asarray(per_image['correct'], bool).reshape(C, R)
    per_class = {str(c): dict({k: _plain(per_image[k][j * R + best[j]]) for k in PER_IMAGE},
                              target_confidence=float(conf[j * R + best[j]]), best_restart_index=int(best[j]),
                              attack_accuracy_all_restarts=float(correct[j].mean()), attacked=c in attacked)
                 for j, c in enumerate(classes)}

    # no attack: the mean public image of each attacked class, scored exactly like the inversions. Where the
    # public labels name no class of the target's (another dataset), every class gets the mean of all images.
    public, device = run['public'], px.device
    pub_y = public['labels'] if public['labels'] is not None else np.full(len(public['images']), -1)
    base = class_mean_images(to_tensor(public['images'], device),
                             torch.as_tensor(pub_y, dtype=torch.long, device=device), attacked)
    with torch.no_grad():
        base_conf = model(base.to(device)).float().softmax(1).gather(
            1, torch.as_tensor(attacked, device=device)[:, None]).squeeze(1)
    base_scores = score_inversions(evaluators, base, attacked, px, py)['per_image']
    baseline = dict(summarise(base_scores, np.ones(len(attacked), bool), base_conf.cpu().numpy()),
                    protocol="no attack: each attacked class's mean image of the GAN's public data",
                    per_class={str(c): {k: _plain(base_scores[k][i]) for k in PER_IMAGE}
                               for i, c in enumerate(attacked)})
    best_images = as_pixels(run['images'][torch.arange(C), torch.from_numpy(best)])
    return {'overall': overall, 'per_class': per_class, 'baseline': baseline, 'best': best, 'per_image': per_image,
            'best_images': best_images, 'baseline_images': as_pixels(base),
            'baseline_per_image': base_scores,
            'predictions': tuple(np.asarray(per_image[k], np.int64).reshape(C, R)
                                 for k in ('eval_prediction', 'second_prediction'))}


def disjoint_metrics(run, scored, reused):
    """metrics['class_disjoint']; the same keys (as None) when it did not run, for the declared headline."""
    if scored is None:
        return {'protocol': 'not run (--no-gmi-class-disjoint)', 'best_restart': {'attack_accuracy': None},
                'all_restarts': {'attack_accuracy': None}, 'no_attack_baseline': {'attack_accuracy': None}}
    attacked = run['attacked']
    return {
        'protocol': ("GMI's MNIST protocol: a GAN that learns from the public classes "
                     f"{run['protocol']['public_classes']} only; the attack targets {attacked}"
                     + (' (the --gmi-public run itself)' if reused else '')),
        'attacked_classes': attacked, 'public_classes': run['protocol']['public_classes'],
        'best_restart': scored['overall']['best_restart'], 'all_restarts': scored['overall']['all_restarts'],
        'public_classes_best_restart': scored['overall'].get('public_classes_best_restart'),
        'no_attack_baseline': scored['baseline'],
        'per_class': {str(c): scored['per_class'][str(c)] for c in attacked},
        'gan_train_seconds': run['gan']['train_seconds'], 'gan_from_cache': run['gan']['from_cache'],
        'gan_cache_path': run['gan']['cache_path'], 'inversion_seconds': run['inversion_seconds'],
        'n_failed': int(torch.isinf(run['log_conf']).sum()), 'reused_main_run': reused}


def write_figures(out_dir, main, s, cd, d, search):
    """gan_inversion_all.png: the best restart per class under each prior, each beside its no-attack row;
    gan_samples.png: unconditioned samples of each GAN."""
    def rows_for(run, scored, label):
        attacked, per_image = run['attacked'], scored['per_image']
        titles = []
        for j, c in enumerate(run['classes']):
            i = j * run['images'].shape[1] + scored['best'][j]
            titles.append(f"{c}{'' if c in attacked else ' (public)'}\n"
                          f"{per_image['eval_prediction'][i]}/{per_image['second_prediction'][i]} "
                          f"({per_image['eval_confidence'][i]:.2f})")
        base, bp = dict(zip(attacked, scored['baseline_images'])), scored['baseline_per_image']
        base_titles = {c: f"{bp['eval_prediction'][i]}/{bp['second_prediction'][i]} ({bp['eval_confidence'][i]:.2f})"
                       for i, c in enumerate(attacked)}
        return ([list(scored['best_images']), [base.get(c) for c in run['classes']]],
                [titles, [base_titles.get(c, '') for c in run['classes']]],
                [label, 'no attack:\nclass mean'])

    rows, titles, labels = rows_for(main, s, f"GMI\n({main['protocol']['name']})")
    if cd is not None:
        more = rows_for(cd, d, 'GMI, GAN\nsaw 5-9')
        rows, titles, labels = rows + more[0], titles + more[1], labels + more[2]
    save_image_grid(os.path.join(out_dir, 'gan_inversion_all.png'), rows, titles, labels,
                    suptitle=f"GMI ({search['search']} search, {search['loss']} identity loss), best restart per class "
                             "by target confidence; label: the two evaluators' predictions (primary's confidence "
                             "for the target class)")
    grids = [(main, f"prior: {main['protocol']['name']}")] + ([(cd, 'GAN saw 5-9')] if cd is not None else [])
    sample_rows, sample_labels = [], []
    for run, label in grids:
        n = 4 if run is main else 2
        sample_rows += [list(run['samples'][r * 10:(r + 1) * 10]) for r in range(n)]
        sample_labels += [label] + [''] * (n - 1)
    save_image_grid(os.path.join(out_dir, 'gan_samples.png'), sample_rows, row_labels=sample_labels,
                    suptitle='GAN priors, unconditioned samples (row label: the public data it learnt from)')
