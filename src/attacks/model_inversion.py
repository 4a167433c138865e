"""Model inversion by confidence maximisation (Fredrikson, Jha & Ristenpart, CCS 2015, "MI-Face").

For each class c the attacker, holding the global model's weights, runs gradient ascent on the
input to make the model as sure as possible that the image shows c; total-variation and L2
penalties keep the image smooth with a dark background instead of high-frequency noise.
Loss variants (src.attacks.common.identity_loss):
  'logit' the raw logit z_c (Nguyen et al., CVPR 2023, "Re-thinking model inversion attacks against
          deep neural networks": maximising the logit rather than the softmax is much stronger); it
          keeps pushing the image deeper into the class;
  'ce'    cross-entropy of class c (Fredrikson's 1 - p_c, in log form); its gradient vanishes as
          p_c -> 1, so it stops as soon as the target is fooled, often by a pattern nothing else reads.
Jitter (a random shift of a few pixels each step, as in feature visualisation, Mordvintsev et al.
2015) rewards only translation-robust shapes. --mi-variant published is MI-Face as published: ce,
no TV, no L2, no jitter. Measured on the standard model over real digits, scored by the evaluation
classifier (80 images, 200 steps, seed 0; all-restart accuracy): logit + TV + L2 + jitter 0.99,
without jitter 0.96, without TV/L2 0.84; ce with the same regularisation 0.65; published 0.24.
All classes and restarts form ONE batch: each image's loss depends only on itself (the model is
in eval mode and has no batch norm) and Adam is element-wise, so the batch optimises exactly
what a per-image loop would, in one pass per step. Images are kept in [0, 1] by clamping after
each Adam step (projected gradient ascent, common.descend): exact 0 pixels are reachable (MNIST's
background), which a sigmoid parametrisation only approaches while its gradient vanishes.
The best restart per class is picked by the TARGET model's log-probability (what the attacker
can see); the two independent evaluation classifiers (src.evaluation) only score the result.

The measure saturates: on MNIST the plain per-class mean of the server's public images is read as
its class by both evaluators too, so the score always stands beside that no-attack baseline, and
beside a class-disjoint one (a server whose public data lacks the attacked classes).
"""
import copy
import math
import os
import time

import numpy as np
import torch

from src.attacks import common
from src.attacks.base import Attack, Report
from src.evaluation import class_mean_images, load_evaluators, score_inversions, summarise
from src.plots import as_pixels, save_image_grid
from src.utils import UserError, autocast, derive_seed, resolve_precision

# what --mi-variant published fixes: MI-Face as Fredrikson et al. publish it
PUBLISHED = {'loss': 'ce', 'tv_weight': 0.0, 'l2_weight': 0.0, 'jitter': 0}


def add_arguments(parser):
    g = parser.add_argument_group('model_inversion', 'confidence-maximisation model inversion (Fredrikson et al. 2015)')
    g.add_argument('--mi-variant', choices=['default', 'published'], default='default',
                   help="'published': MI-Face as Fredrikson et al. publish it (ce loss, no TV, no L2, no jitter; "
                        "overrides --mi-loss, --mi-tv, --mi-l2 and --mi-jitter); 'default': the flags below")
    g.add_argument('--mi-loss', choices=['logit', 'ce'], default='logit',
                   help="what to maximise: 'logit' (raw class logit, stronger) or 'ce' (class log-probability)")
    g.add_argument('--mi-steps', type=int, default=200, help='Adam steps on the input')
    g.add_argument('--mi-lr', type=float, default=0.1, help='Adam learning rate on the pixels')
    g.add_argument('--mi-restarts', type=int, default=8,
                   help='random restarts per class (best kept by target confidence)')
    g.add_argument('--mi-tv', type=float, default=5.0, help='total-variation weight (on mean |neighbour difference|)')
    g.add_argument('--mi-l2', type=float, default=10.0, help='L2 weight (on mean squared pixel)')
    g.add_argument('--mi-jitter', type=int, default=2,
                   help='shift the image by up to this many pixels at random each step (0: off)')
    g.add_argument('--mi-precision', choices=['auto', 'bf16', 'fp32'], default='auto',
                   help='bf16 autocast for the model during the ascent (auto: where the hardware runs it natively)')
    g.add_argument('--mi-init', choices=['noise', 'blank'], default='noise',
                   help="start from uniform noise in [0, 1] or a near-black image (uniform in [0, 0.05])")


def check_args(args):
    if (args.mi_steps < 1 or args.mi_restarts < 1 or not args.mi_lr > 0 or not args.mi_tv >= 0
            or not args.mi_l2 >= 0 or not 0 <= args.mi_jitter < 14):
        raise UserError('model inversion needs --mi-steps >= 1, --mi-restarts >= 1, --mi-lr > 0, '
                        '--mi-tv >= 0, --mi-l2 >= 0 and 0 <= --mi-jitter < 14')
    if getattr(args, 'mi_variant', 'default') not in ('default', 'published'):
        raise UserError(f"--mi-variant {args.mi_variant!r}: use 'default' or 'published'")


def effective_settings(args, device):
    """The settings the attack really runs with (the published variant fixes loss and regularisers)."""
    variant = getattr(args, 'mi_variant', 'default')
    s = {'variant': variant, 'loss': args.mi_loss, 'tv_weight': float(args.mi_tv), 'l2_weight': float(args.mi_l2),
         'jitter': int(args.mi_jitter)}
    if variant == 'published':
        s.update(PUBLISHED)
    return dict(s, steps=args.mi_steps, lr=args.mi_lr, restarts=args.mi_restarts, init=args.mi_init,
                precision=resolve_precision(args.mi_precision, torch.device(device)),
                pixel_constraint='clamp to [0, 1] after each Adam step', optimizer='Adam')


def invert(model, x0, classes, steps, lr, loss='logit', tv_weight=5.0, l2_weight=10.0, jitter=2, seed=0,
           precision='fp32', progress=None):
    """Gradient ascent on a batch of images, each toward its own class; returns (images, target log-prob).

    x0: (N, C, H, W) start images in [0, 1]; classes: (N,) int64. Every image is optimised
    independently (see module docstring), so N can mix classes and restarts freely. precision='bf16'
    runs the model under bf16 autocast; the images, the loss and the final confidences stay fp32.
    A regulariser with weight 0 is not computed at all (the published variant runs the bare loss).
    progress: a tqdm description, or None.
    """
    if loss not in ('logit', 'ce'):
        raise UserError(f"unknown model-inversion loss {loss!r}: use 'logit' or 'ce'")
    # a private copy: eval mode (dropout off: the attacker inverts the deterministic model), no weight
    # gradients (only the input's are needed), channels_last (oneDNN's fast conv and max-pool kernels;
    # 2x with bf16, measured) -- and the caller's model is left exactly as it was
    work = copy.deepcopy(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    x0 = x0.contiguous(memory_format=torch.channels_last)
    shifts = torch.randint(-jitter, jitter + 1, (steps, 2), generator=torch.Generator().manual_seed(
        derive_seed(seed, 'model-inversion', 'jitter'))).tolist()

    def objective(x, step):
        # jitter: the model sees the image shifted by a few pixels (one shift per step for the whole
        # batch), so only patterns that survive translation, i.e. shapes rather than pixel noise, pay off
        seen = torch.roll(x, shifts[step], dims=(2, 3)) if jitter else x
        with autocast(x.device, precision):  # bf16 convs/matmuls (AMX); x, loss and Adam stay fp32
            logits = work(seen).float()
        out = common.identity_loss(logits, classes, loss)
        if tv_weight:
            out = out + tv_weight * common.total_variation(x)
        if l2_weight:
            out = out + l2_weight * x.square().flatten(1).mean(1)
        return out

    x, failed = common.descend(x0, objective, steps, lr, optimizer='adam', bounds=(0.0, 1.0), progress=progress)
    with torch.no_grad():
        log_prob = work(x).float().log_softmax(1).gather(1, classes[:, None]).squeeze(1)
    # a diverged image is reported as failed (log-prob -inf, black), never picked as a class's best
    failed |= ~torch.isfinite(log_prob)
    images = x.masked_fill(failed[:, None, None, None], 0).contiguous()
    return images, log_prob.masked_fill(failed, -math.inf)


def start_images(num_classes, restarts, init, seed, device, shape=(1, 28, 28)):
    """(num_classes * restarts) start images of `shape`, class-major, from the seed (same on every device)."""
    g = torch.Generator().manual_seed(derive_seed(seed, 'model-inversion', 'init'))
    scale = 1.0 if init == 'noise' else 0.05
    x0 = torch.rand(num_classes * restarts, *shape, generator=g) * scale
    classes = torch.arange(num_classes).repeat_interleave(restarts)
    return x0.to(device), classes.to(device)


@torch.no_grad()
def target_confidence(model, images, classes):
    """The attacked model's softmax probability for each image's class (eval mode, fp32)."""
    was_training = model.training
    model.eval()
    try:
        return model(images).float().softmax(1).gather(1, classes[:, None]).squeeze(1)
    finally:
        model.train(was_training)


def _fmt(summary):
    value = summary['attack_accuracy']
    return 'n/a' if value is None else f'{value:.3f}'


class ModelInversion(Attack):
    name = 'model'
    key = 'model_inversion'
    title = 'Model inversion (confidence maximisation)'
    figures = ('model_inversion_all.png',)
    headline = (('overall.best_restart.attack_accuracy', 'attack accuracy (best restart)', 'fraction'),
                ('no_attack_baseline.attack_accuracy', 'no attack: public class means', 'fraction'),
                ('class_disjoint.best_restart.attack_accuracy', 'attack accuracy, classes 0-4', 'fraction'),
                ('class_disjoint.no_attack_baseline.attack_accuracy',
                 'no attack, classes 0-4 without their public images', 'fraction'),
                ('overall.best_restart.knn_feature_distance', 'KNN feature distance', 'number'))

    def add_arguments(self, parser):
        add_arguments(parser)

    def check(self, settings):
        check_args(settings)

    def run(self, view, settings):
        """The inversions, from the global model alone: {images (classes, R, C, H, W), log_prob (classes, R),
        best (C,), settings, attack_seconds}."""
        check_args(settings)
        device = view.device
        s = effective_settings(settings, device)
        R = s['restarts']
        K = view.spec.num_classes
        x0, classes = start_images(K, R, s['init'], settings.seed, device, view.spec.shape)
        started = time.perf_counter()
        images, log_prob = invert(view.model, x0, classes, s['steps'], s['lr'], s['loss'], s['tv_weight'],
                                  s['l2_weight'], s['jitter'], settings.seed, s['precision'],
                                  progress=f'model inversion ({K} classes x {R} restarts)')
        log_prob = log_prob.view(K, R)
        return {'images': images.view(K, R, *view.spec.shape), 'log_prob': log_prob,
                'best': common.best_restart(log_prob),  # chosen by the TARGET model only
                'settings': s, 'attack_seconds': time.perf_counter() - started}

    def score(self, result, private, truth, view, settings, out_dir):
        device, s = view.device, result['settings']
        images, log_prob, best = result['images'], result['log_prob'], result['best'].cpu()
        K, R = images.shape[:2]
        attacked, public = common.class_halves(K)
        classes = torch.arange(K, device=device).repeat_interleave(R)
        best_images = images[torch.arange(K, device=images.device), best.to(images.device)]  # (K, C, H, W)

        evaluators = load_evaluators(private.dataset, settings.seed, view.cache_dir, device)
        px, py = private.clients()
        per_image = score_inversions(evaluators, images.flatten(0, 1), classes, px, py)['per_image']
        is_best = np.zeros((K, R), dtype=bool)
        is_best[np.arange(K), best.numpy()] = True
        is_best = is_best.ravel()
        cls = np.asarray(per_image['target_class'])
        target_conf = log_prob.exp().flatten().cpu().numpy()

        def both(mask):
            return {'best_restart': summarise(per_image, is_best & mask, target_conf),
                    'all_restarts': summarise(per_image, mask, target_conf)}

        def pick(key):
            return np.asarray(per_image[key])[is_best]  # one per class, class order

        per_class = {str(c): dict(both(cls == c), best_restart_index=int(best[c]),
                                  eval_prediction_best=int(pick('eval_prediction')[c]),
                                  second_prediction_best=int(pick('second_prediction')[c]))
                     for c in range(K)}
        overall = both(np.ones(len(cls), dtype=bool))
        disjoint = both(np.isin(cls, attacked))

        # the no-attack baselines, scored exactly like the inversions (same evaluators, same private set)
        all_classes = list(range(K))
        means = class_mean_images(view.public_x, view.public_y, all_classes)
        baseline, baseline_images = self._score_baseline(evaluators, view, means, all_classes, px, py)
        public_only = torch.isin(view.public_y, torch.tensor(public, device=view.public_y.device))
        if public_only.any():
            disjoint_means = class_mean_images(view.public_x[public_only], view.public_y[public_only], attacked)
            disjoint_baseline, _ = self._score_baseline(evaluators, view, disjoint_means, attacked, px, py)
        else:  # no public image of 5-9 to average: undefined (count 0, None)
            disjoint_baseline = summarise(per_image, np.zeros(len(cls), dtype=bool), target_conf)

        b, a = overall['best_restart'], overall['all_restarts']
        metrics = {
            'summary': (f"attack accuracy (both evaluators agree) {_fmt(b)} best restart per class, {_fmt(a)} all "
                        f"{R} restarts; no attack (public class means) {_fmt(baseline)}; classes 0-4: attack "
                        f"{_fmt(disjoint['best_restart'])}, no attack without their public images "
                        f"{_fmt(disjoint_baseline)}; {s['variant']} variant ({s['loss']}); "
                        f"attack {result['attack_seconds']:.1f} s"),
            'seed': settings.seed,
            'n_failed': int(torch.isinf(log_prob).sum()),  # diverged images (none is used as a result)
            'attack_seconds': result['attack_seconds'],
            'settings': s,
            'overall': overall,
            'per_class': per_class,
            'no_attack_baseline': dict(baseline, protocol='no attack: per class, the mean of the server\'s public '
                                                          'images of that class (the test split), scored exactly '
                                                          'like the inversions'),
            'class_disjoint': {
                'protocol': ('classes 0-4 attacked by a server whose public data holds classes 5-9 only. '
                             'Confidence maximisation uses no public data, so its numbers are the same inversions '
                             'restricted to classes 0-4; the no-attack baseline is what that server has without '
                             'attacking: the mean of its 5-9 images, for every class 0-4'),
                'attacked_classes': attacked, 'public_classes': public,
                **disjoint, 'no_attack_baseline': disjoint_baseline},
            'evaluators': evaluators.info,
            'eval_classifier': {k: evaluators.info['primary'][k] for k in (
                'test_accuracy', 'dataset', 'num_train', 'num_test', 'seed', 'from_cache', 'cache_path', 'hparams',
                'feature_precision')},
            'threat_model': {
                'attacker': 'honest-but-curious server',
                'knows': 'white-box final global model (weights, architecture), the number of classes, '
                         'the input shape and pixel range [0, 1]',
                'does_not_know': 'any training image or auxiliary data; no client update is used',
                'baseline_only': "the server's public data (the test split): its class means are the no-attack "
                                 'baseline; the attack itself uses none of it',
                'scoring_only': "the clients' private training images (for KNN distance) and two independent "
                                'evaluation classifiers of different families (a CNN and an MLP on pixels) trained '
                                'centrally on the training split; an inversion counts only if both read its class',
            },
        }
        self._figure(out_dir, best_images, per_image, is_best, means, baseline_images, b['attack_accuracy'],
                     baseline['attack_accuracy'], s, R)
        arrays = {
            'best_images': as_pixels(best_images),                                                # (classes, H, W[, 3])
            'all_restarts': as_pixels(images),                                                 # (classes, R, H, W[, 3])
            'classes': np.arange(K, dtype=np.int64),
            'eval_predictions': pick('eval_prediction').astype(np.int64),                          # best restart
            'second_predictions': pick('second_prediction').astype(np.int64),
            'eval_predictions_all': np.asarray(per_image['eval_prediction'], np.int64).reshape(K, R),
            'second_predictions_all': np.asarray(per_image['second_prediction'], np.int64).reshape(K, R),
            'target_confidence_all': target_conf.reshape(K, R).astype(np.float32),
            'baseline_images': as_pixels(means),                                                  # (classes, H, W[, 3])
        }
        return Report(metrics, arrays)

    @staticmethod
    def _score_baseline(evaluators, view, means, classes, px, py):
        cls = torch.tensor(classes, device=means.device)
        scored = score_inversions(evaluators, means, cls, px, py)
        conf = target_confidence(view.model, means.to(view.device), cls.to(view.device))
        return summarise(scored['per_image'], np.ones(len(classes), dtype=bool), conf), scored['per_image']

    @staticmethod
    def _figure(out_dir, best_images, per_image, is_best, means, baseline, attack_accuracy, baseline_accuracy, s, R):
        def label(p, q, p2):  # primary's prediction (its confidence for the target) / second's prediction
            return f'{p} ({q:.2f}) / {p2}'

        keys = ('eval_prediction', 'eval_confidence', 'second_prediction')
        picked = [np.asarray(per_image[k])[is_best] for k in keys]
        # both rows' labels go above the top row: save_image_grid's titles on a second row would sit under the
        # first row's images
        shown = zip(zip(*picked), zip(*(baseline[k] for k in keys)))
        titles = [[f'target {c}\nattack {label(*a)}\nmean {label(*m)}' for c, (a, m) in enumerate(shown)],
                  [None] * len(best_images)]
        save_image_grid(
            os.path.join(out_dir, 'model_inversion_all.png'),
            [list(as_pixels(best_images)), list(as_pixels(means))], titles,
            row_labels=['attack', 'no attack:\npublic class mean'], cell=1.5,
            suptitle=(f"Model inversion ({s['variant']}: {s['loss']} loss), best of {R} restarts by target confidence, "
                      f"above; each class's mean public image (no attack), below.\nLabels: primary evaluator's "
                      f"prediction (its confidence for the target) / second evaluator's. Both read the target: attack "
                      f"{100 * attack_accuracy:.0f} %, no attack {100 * baseline_accuracy:.0f} %"))
