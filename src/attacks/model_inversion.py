"""Model inversion by confidence maximisation (Fredrikson, Jha & Ristenpart, CCS 2015, "MI-Face").

For each class c the attacker, holding the global model's weights, runs gradient ascent on the
input to make the model as sure as possible that the image shows c; total-variation and L2
penalties keep the image smooth with a dark background instead of high-frequency noise.
Loss variants:
  'logit' the raw logit z_c (Nguyen et al., CVPR 2023, "Re-thinking model inversion attacks against
          deep neural networks": maximising the logit rather than the softmax is much stronger); it
          keeps pushing the image deeper into the class;
  'ce'    cross-entropy of class c (Fredrikson's 1 - p_c, in log form); its gradient vanishes as
          p_c -> 1, so it stops as soon as the target is fooled, often by a pattern nothing else reads.
Jitter (a random shift of a few pixels each step, as in feature visualisation, Mordvintsev et al.
2015) rewards only translation-robust shapes. Measured on the standard model over real digits,
scored by the evaluation classifier (80 images, 200 steps, seed 0; all-restart accuracy):
logit + TV + L2 + jitter 0.99, without jitter 0.96, without TV/L2 0.84; ce with the same
regularisation 0.65; plain ce (no TV, L2 or jitter: MI-Face as published) 0.24.
All classes and restarts form ONE batch: each image's loss depends only on itself (the model is
in eval mode and has no batch norm) and Adam is element-wise, so the batch optimises exactly
what a per-image loop would, in one pass per step. Images are kept in [0, 1] by clamping after
each Adam step (projected gradient ascent): exact 0 pixels are reachable (MNIST's background),
which a sigmoid parametrisation only approaches while its gradient vanishes.
The best restart per class is picked by the TARGET model's log-probability (what the attacker
can see); the independent evaluation classifier (src.evaluation) only scores the result.
"""
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from src.client import autocast
from src.data import NUM_CLASSES
from src.evaluation import load_or_train_eval_classifier, private_data, score_inversions
from src.plots import save_image_grid
from src.utils import UserError, derive_seed, resolve_precision


def add_arguments(parser):
    g = parser.add_argument_group('model_inversion', 'confidence-maximisation model inversion (Fredrikson et al. 2015)')
    g.add_argument('--mi-loss', choices=['logit', 'ce'], default='logit',
                   help="what to maximise: 'logit' (raw class logit, stronger) or 'ce' (class log-probability)")
    g.add_argument('--mi-steps', type=int, default=200, help='Adam steps on the input')
    g.add_argument('--mi-lr', type=float, default=0.1, help='Adam learning rate on the pixels')
    g.add_argument('--mi-restarts', type=int, default=8, help='random restarts per class (best kept by target confidence)')
    g.add_argument('--mi-tv', type=float, default=5.0, help='total-variation weight (on mean |neighbour difference|)')
    g.add_argument('--mi-l2', type=float, default=10.0, help='L2 weight (on mean squared pixel)')
    g.add_argument('--mi-jitter', type=int, default=2,
                   help='shift the image by up to this many pixels at random each step (0: off)')
    g.add_argument('--mi-precision', choices=['auto', 'bf16', 'fp32'], default='auto',
                   help='bf16 autocast for the model during the ascent (auto: where the hardware runs it natively)')
    g.add_argument('--mi-init', choices=['noise', 'blank'], default='noise',
                   help="start from uniform noise in [0, 1] or a near-black image (uniform in [0, 0.05])")


def total_variation(x):
    """Mean absolute difference between neighbouring pixels, per image: (N,)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def inversion_loss(logits, classes, loss):
    """Per-image objective to MINIMISE: -z_c or cross-entropy."""
    if loss == 'logit':
        return -logits.gather(1, classes[:, None]).squeeze(1)
    return F.cross_entropy(logits, classes, reduction='none')


def invert(model, x0, classes, steps, lr, loss='logit', tv_weight=5.0, l2_weight=10.0, jitter=2, seed=0,
           precision='fp32', progress=None):
    """Gradient ascent on a batch of images, each toward its own class; returns (images, target log-prob).

    x0: (N, 1, 28, 28) start images in [0, 1]; classes: (N,) int64. Every image is optimised
    independently (see module docstring), so N can mix classes and restarts freely. precision='bf16'
    runs the model under bf16 autocast; the images, the loss and the final confidences stay fp32.
    """
    if loss not in ('logit', 'ce'):
        raise UserError(f"unknown model-inversion loss {loss!r}: use 'logit' or 'ce'")
    # a private copy: eval mode (dropout off: the attacker inverts the deterministic model), no weight
    # gradients (only the input's are needed), channels_last (oneDNN's fast conv and max-pool kernels;
    # 2x with bf16, measured) -- and the caller's model is left exactly as it was
    work = copy.deepcopy(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    x = x0.detach().clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    shifts = torch.randint(-jitter, jitter + 1, (steps, 2), generator=torch.Generator().manual_seed(
        derive_seed(seed, 'model-inversion', 'jitter'))).tolist()
    failed = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for step in range(steps):
        # jitter: the model sees the image shifted by a few pixels (one shift per step for the whole
        # batch), so only patterns that survive translation, i.e. shapes rather than pixel noise, pay off
        seen = torch.roll(x, shifts[step], dims=(2, 3)) if jitter else x
        with autocast(x.device, precision):  # bf16 convs/matmuls (AMX); x, loss and Adam stay fp32
            logits = work(seen).float()
        objective = (inversion_loss(logits, classes, loss)
                     + tv_weight * total_variation(x) + l2_weight * x.square().flatten(1).mean(1))
        bad = ~torch.isfinite(objective)  # a diverged image must not poison the others' steps
        failed |= bad
        optimizer.zero_grad(set_to_none=True)
        objective.masked_fill(bad, 0).sum().backward()  # sum: each image gets exactly its own gradient
        x.grad.nan_to_num_(0.0, 0.0, 0.0)
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        if progress is not None:
            progress.update(1)
    with torch.no_grad():
        log_prob = work(x).float().log_softmax(1).gather(1, classes[:, None]).squeeze(1)
    # a diverged image is reported as failed (log-prob -inf, black), never picked as a class's best
    failed |= ~torch.isfinite(log_prob) | ~torch.isfinite(x.detach()).flatten(1).all(1)
    images = x.detach().masked_fill(failed[:, None, None, None], 0).contiguous()
    return images, log_prob.masked_fill(failed, -math.inf)


def start_images(num_classes, restarts, init, seed, device):
    """(num_classes * restarts) start images, class-major, from the seed (same on every device)."""
    g = torch.Generator().manual_seed(derive_seed(seed, 'model-inversion', 'init'))
    scale = 1.0 if init == 'noise' else 0.05
    x0 = torch.rand(num_classes * restarts, 1, 28, 28, generator=g) * scale
    classes = torch.arange(num_classes).repeat_interleave(restarts)
    return x0.to(device), classes.to(device)


def run(target, args, out_dir):
    if (args.mi_steps < 1 or args.mi_restarts < 1 or args.mi_lr <= 0 or args.mi_tv < 0 or args.mi_l2 < 0
            or not 0 <= args.mi_jitter < 14):
        raise UserError('model inversion needs --mi-steps >= 1, --mi-restarts >= 1, --mi-lr > 0, '
                        '--mi-tv >= 0, --mi-l2 >= 0 and 0 <= --mi-jitter < 14')
    device = target.device
    restarts = args.mi_restarts
    precision = resolve_precision(args.mi_precision, device)
    x0, classes = start_images(NUM_CLASSES, restarts, args.mi_init, args.seed, device)

    started = time.perf_counter()
    with tqdm(total=args.mi_steps, desc=f'model inversion ({NUM_CLASSES} classes x {restarts} restarts)',
              unit='step', leave=False) as bar:
        images, log_prob = invert(target.model, x0, classes, args.mi_steps, args.mi_lr, args.mi_loss,
                                  args.mi_tv, args.mi_l2, args.mi_jitter, args.seed, precision, bar)
    attack_seconds = time.perf_counter() - started

    images = images.view(NUM_CLASSES, restarts, 1, 28, 28)
    log_prob = log_prob.view(NUM_CLASSES, restarts)
    best = log_prob.argmax(1)                                  # chosen by the TARGET model only
    best_images = images[torch.arange(NUM_CLASSES, device=device), best]

    eval_model, eval_info = load_or_train_eval_classifier(
        target.data, args.seed, getattr(args, 'cache_dir', 'cache'), device)
    px, py = private_data(target)
    flat = images.flatten(0, 1)
    score_all = score_inversions(eval_model, flat, classes, px, py)
    is_best = torch.zeros(NUM_CLASSES, restarts, dtype=torch.bool)
    is_best[torch.arange(NUM_CLASSES), best.cpu()] = True
    is_best = is_best.flatten().numpy()

    per_image = {k: np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
                 for k, vals in score_all['per_image'].items()}
    correct = per_image['eval_prediction'] == per_image['target_class']
    target_conf = log_prob.exp().flatten().cpu().numpy()

    def summary(mask):
        feat, pix = per_image['knn_feature_distance'][mask], per_image['knn_pixel_distance'][mask]
        return {
            'attack_accuracy': float(correct[mask].mean()),
            'eval_confidence': float(per_image['eval_confidence'][mask].mean()),
            'knn_feature_distance': None if np.isnan(feat).all() else float(np.nanmean(feat)),
            'knn_pixel_distance': None if np.isnan(pix).all() else float(np.nanmean(pix)),
            'target_confidence': float(target_conf[mask].mean()),
        }

    per_class = {}
    cls = per_image['target_class']
    for c in range(NUM_CLASSES):
        per_class[str(c)] = {'best_restart': summary(is_best & (cls == c)), 'all_restarts': summary(cls == c),
                             'best_restart_index': int(best[c]),
                             'eval_prediction_best': int(per_image['eval_prediction'][is_best & (cls == c)][0])}
    total_seconds = time.perf_counter() - started

    eval_pred_best = per_image['eval_prediction'][is_best].astype(np.int64)
    titles = [[f'target {c}\neval: {p} ({conf:.2f})' for c, p, conf in
               zip(range(NUM_CLASSES), eval_pred_best, _eval_conf_of_prediction(eval_model, best_images))]]
    save_image_grid(os.path.join(out_dir, 'model_inversion_all.png'),
                    [list(best_images.squeeze(1).cpu().numpy())], titles,
                    suptitle=f'Model inversion ({args.mi_loss} loss, best of {restarts} restarts by target '
                             f'confidence); label: evaluation classifier\'s prediction (its confidence)')

    overall = {'best_restart': summary(is_best),             # one image per class: the restart the target was surest of
               'all_restarts': summary(np.ones_like(is_best))}  # every restart of every class
    metrics = {
        'summary': (f"evaluation-classifier attack accuracy {overall['best_restart']['attack_accuracy']:.3f} "
                    f"(best restart per class), {overall['all_restarts']['attack_accuracy']:.3f} (all "
                    f"{restarts} restarts); attack {attack_seconds:.1f} s"),
        'seed': args.seed,
        'n_failed': int(torch.isinf(log_prob).sum()),  # diverged images (none is used as a result)
        'seconds': total_seconds,
        'attack_seconds': attack_seconds,
        'settings': {'loss': args.mi_loss, 'steps': args.mi_steps, 'lr': args.mi_lr, 'restarts': restarts,
                     'tv_weight': args.mi_tv, 'l2_weight': args.mi_l2, 'jitter': args.mi_jitter,
                     'init': args.mi_init, 'precision': precision,
                     'pixel_constraint': 'clamp to [0, 1] after each Adam step', 'optimizer': 'Adam'},
        'overall': overall,
        'per_class': per_class,
        'eval_classifier': {k: eval_info[k] for k in ('test_accuracy', 'dataset', 'num_train', 'num_test',
                                                      'seed', 'from_cache', 'cache_path', 'hparams',
                                                      'feature_precision')},
        'threat_model': {
            'attacker': 'honest-but-curious server',
            'knows': 'white-box final global model (weights, architecture), the number of classes, '
                     'the input shape and pixel range [0, 1]',
            'does_not_know': 'any training image or auxiliary data; no client update is used',
            'scoring_only': 'the clients\' private training images (for KNN distance) and an independent '
                            'evaluation classifier trained centrally on the training split',
        },
    }
    arrays = {
        'best_images': best_images.squeeze(1).cpu().numpy().astype(np.float32),                # (10, 28, 28)
        'all_restarts': images.squeeze(2).cpu().numpy().astype(np.float32),                    # (10, R, 28, 28)
        'classes': np.arange(NUM_CLASSES, dtype=np.int64),
        'eval_predictions': eval_pred_best,                                                     # best restart
        'eval_predictions_all': per_image['eval_prediction'].astype(np.int64).reshape(NUM_CLASSES, restarts),
        'target_confidence_all': target_conf.reshape(NUM_CLASSES, restarts).astype(np.float32),
    }
    return metrics, arrays


@torch.no_grad()
def _eval_conf_of_prediction(eval_model, images):
    return eval_model.eval()(images).float().softmax(1).max(1).values.cpu().numpy()
