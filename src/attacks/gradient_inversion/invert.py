"""Every intercepted gradient attacked with the chosen method (--gi-method): DLG, iDLG, or the default
(labels and fc1 inputs in closed form, then the feature search; the cosine search for batches that do
not separate)."""
from dataclasses import dataclass

import torch

from src.attacks.gradient_inversion.closed_form import (labels_from_fc1_output_grads, recover_fc_input,
                                                        separate_fc_inputs)
from src.attacks.gradient_inversion.cnn import frozen
from src.attacks.gradient_inversion.dlg import ITERATIONS, dlg_attack
from src.attacks.gradient_inversion.labels import recover_labels
from src.attacks.gradient_inversion.search import BATCH_STEPS, STEPS, cosine_search, feature_search
from src.utils import UserError

METHODS = ('dlg', 'idlg', 'default')


@dataclass
class Inversion:
    """What the attack recovered from n_batches gradients of batch_size images each, in batch order."""
    images: torch.Tensor     # (N, 1, 28, 28) in [0, 1]; black where failed
    labels: torch.Tensor     # (N,) int64; inside a batch in no particular order
    failed: torch.Tensor     # (N,) bool: diverged on every try, never passed off as a result
    restarted: torch.Tensor  # (N,) bool: diverged once and searched again


def invert_single_images(model, grads, steps, restarts, generator, prior_image=None, progress=True):
    """Batch size 1: label and fc1 input in closed form, then the feature search.

    Returns (images (N,1,28,28), labels (N,), a2 distance (N,), failed (N,), restarted (N,))."""
    labels = recover_labels(grads['fc2.bias'], 1)[:, 0]
    a2_target = recover_fc_input(grads['fc1.weight'], grads['fc1.bias'])
    G = grads['fc1.bias'] @ model.fc1.weight  # dL/da2, exact whatever the dropout mask
    W2, W1 = grads['conv2.weight'].flatten(2), grads['conv1.weight'].flatten(2)
    images, dist, failed, restarted = feature_search(model, a2_target, G, W2, W1, 1, steps, restarts, generator,
                                                     prior_image, progress)
    return images, labels, dist, failed, restarted


def invert_batches(model, grads, batch_size, steps, restarts, generator, prior_image=None, progress=True):
    """Batches: separate each image's fc1 input where the gradient allows, then the feature search.

    Batches whose fc1 gradient does not separate into batch_size images fall back to the cosine
    search (Geiping et al.) with the label counts. Separated images get exact labels from their
    own fc1 output gradient.
    Returns (images, labels (n_batches*B,), failed (n_batches*B,), restarted (n_batches*B,),
    separated (n_batches,) bool).
    """
    B = batch_size
    counts = recover_labels(grads['fc2.bias'], B)
    n_batches = counts.shape[0]
    parts = [separate_fc_inputs(grads['fc1.weight'][i], grads['fc1.bias'][i], B) for i in range(n_batches)]
    sep = torch.tensor([p is not None for p in parts])
    images = torch.zeros(n_batches * B, 1, 28, 28, device=grads['fc1.bias'].device)
    labels = counts.clone()
    failed = torch.zeros(n_batches * B, dtype=torch.bool)
    restarted = torch.zeros(n_batches * B, dtype=torch.bool)
    if sep.any():
        a2 = torch.cat([p[0] for p in parts if p is not None])
        d = torch.cat([p[1] for p in parts if p is not None])
        keep = sep.nonzero().flatten()
        W2 = grads['conv2.weight'][keep].flatten(2)
        W1 = grads['conv1.weight'][keep].flatten(2)
        x, _, f, r = feature_search(model, a2, d @ model.fc1.weight, W2, W1, B, steps, restarts, generator,
                                    prior_image, progress)
        labels[keep] = labels_from_fc1_output_grads(model, d).view(-1, B)
        idx = (keep[:, None] * B + torch.arange(B)).flatten()
        images[idx], failed[idx], restarted[idx] = x, f.cpu(), r
    if (~sep).any():
        rest = (~sep).nonzero().flatten()
        sub = {k: v[rest] for k, v in grads.items()}
        x, _, f, r = cosine_search(model, sub, counts[rest], B, steps, generator, progress=progress)
        idx = (rest[:, None] * B + torch.arange(B)).flatten()
        images[idx], failed[idx], restarted[idx] = x, f.repeat_interleave(B).cpu(), r.repeat_interleave(B).cpu()
    return images, labels.reshape(-1), failed, restarted, sep


def invert(model, grads, method, batch_size, iterations=None, restarts=2, seed=0, progress=True, prior_image=None):
    """Attack every intercepted gradient in `grads` ({name: (n_batches, *shape)}) -> Inversion.

    iterations: L-BFGS steps for dlg/idlg (default ITERATIONS), Adam steps for the default method
    (default STEPS, BATCH_STEPS for batches). prior_image: public data's mean image, one start of the
    default method's search. Failed images are black and flagged, never passed off. The model is used
    in eval mode with its weights frozen, and left as it was.
    """
    if method not in METHODS:
        raise UserError(f'unknown --gi-method {method!r}: choose dlg, idlg or default')
    if method != 'default' and batch_size != 1:
        raise UserError(f'--gi-method {method} attacks single-image gradients: use --gi-batch-size 1')
    generator = torch.Generator().manual_seed(seed)
    with frozen(model):
        if method != 'default':
            images, labels, failed, restarted = dlg_attack(model, grads, method, iterations or ITERATIONS, generator,
                                                           progress)
            return Inversion(images, labels, failed, restarted)
        if batch_size == 1:
            images, labels, _, failed, restarted = invert_single_images(model, grads, iterations or STEPS, restarts,
                                                                        generator, prior_image, progress)
        else:
            images, labels, failed, restarted, _ = invert_batches(model, grads, batch_size, iterations or BATCH_STEPS,
                                                                  restarts, generator, prior_image, progress)
    images = torch.where(failed[:, None, None, None].to(images.device), torch.zeros_like(images), images)
    return Inversion(images, labels, failed.cpu(), restarted.cpu())
