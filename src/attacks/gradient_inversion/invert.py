"""Every intercepted gradient attacked with the chosen method (--gi-method): DLG, iDLG, or the default
(labels and fc1 inputs in closed form, then the feature search; the cosine search for batches that do
not separate)."""
from dataclasses import dataclass

import torch

import src.attacks.gradient_inversion.layers as layers
from src.attacks.gradient_inversion.closed_form import (inputs_alone, output_errors, recover_fc_input, same_direction,
                                                        separate_batch, separate_by_inputs)
from src.attacks.gradient_inversion.dlg import ITERATIONS, dlg_attack
from src.attacks.gradient_inversion.labels import recover_labels
from src.attacks.gradient_inversion.search import BATCH_STEPS, STEPS, conv_targets, cosine_search, feature_search
from src.attacks.gradient_inversion.unseen import fill_unseen, unseen_pixels
from src.utils import UserError

METHODS = ('dlg', 'idlg', 'default')


@dataclass
class Inversion:
    """What the attack recovered from n_batches gradients of batch_size images each, in batch order."""
    images: torch.Tensor     # (N, C, H, W) in [0, 1]; black where failed
    labels: torch.Tensor     # (N,) int64; inside a batch in no particular order
    failed: torch.Tensor     # (N,) bool: diverged on every try, never passed off as a result
    restarted: torch.Tensor  # (N,) bool: diverged once and searched again


def invert_single_images(model, grads, steps, restarts, generator, prior_image=None, progress=True):
    """Batch size 1: label and the first FC layer's input in closed form, then the feature search.

    Returns (images (N, C, H, W), labels (N,), a2 distance (N,), failed (N,), restarted (N,))."""
    labels = recover_labels(grads[layers.output_bias(model)], 1)[:, 0]
    name, fc = layers.first_fc(model)
    a2_target = recover_fc_input(grads[name + '.weight'], grads[name + '.bias'])
    G = grads[name + '.bias'] @ fc.weight  # dL/da2, exact whatever the dropout mask
    pixels = layers.pixels_from_fc_input(model, a2_target)
    if pixels is not None:  # the FC layer reads the pixels: its input is the image, nothing to search
        no = torch.zeros(len(pixels), dtype=torch.bool)
        return pixels, labels, torch.zeros(len(pixels), device=pixels.device), no, no.clone()
    images, dist, failed, restarted = feature_search(model, a2_target, G, conv_targets(model, grads), 1, steps,
                                                     restarts, generator, prior_image, progress)
    return images, labels, dist, failed, restarted


def invert_batches(model, grads, batch_size, steps, restarts, generator, public=None, progress=True):
    """Batches: separate each image's fc1 input where the gradient allows, then the feature search.

    Separation is SPEAR's (separate_batch); where that leaves images out and the model is the CNN, also from the
    inputs' side (separate_by_inputs, which needs the public images' fc1 inputs), adding the images it finds;
    above B = 24 the inputs' side alone. Images still left out are looked for by their inputs alone
    (inputs_alone: with the separated images' terms taken out of the gradient; some with their gradient, the
    rest with their input only, whose search then matches fc1's input alone).

    Batches whose fc1 gradient does not separate fall back to the cosine search (Geiping et al.) with
    the label counts. Separated images get exact labels from their own fc1 output gradient where the
    layer after fc1 is the output layer (the CNN), and an image of such a batch that came out wrong or was
    left out (flagged failed) from what the output-bias gradient leaves once the others' are taken out
    (separated_labels); in other models the batch's label counts.
    Returns (images, labels (n_batches*B,), failed (n_batches*B,), restarted (n_batches*B,),
    separated (n_batches,) bool).
    """
    B = batch_size
    counts = recover_labels(grads[layers.output_bias(model)], B)
    n_batches = counts.shape[0]
    name, fc = layers.first_fc(model)
    nonnegative = layers.fc_input_is_nonnegative(model)
    zero_rate = None
    if public is not None and layers.is_cnn(model):
        with torch.no_grad():
            zero_rate = (layers.fc_input(model, fc, public.to(fc.weight.device)) <= 0).float().mean(0)
    parts = []
    # SPEAR's random picks of units find no batch above B = 24 on the trained CNN (seed 0, B = 32: one image in
    # 87 s of picks), so there the input side goes alone
    spear = zero_rate is None or B <= 24
    for wg, bg in zip(grads[name + '.weight'], grads[name + '.bias']):  # exact for every image that separates
        part = separate_batch(wg, bg, B, nonnegative, (fc.weight, fc.bias)) if spear else None
        if zero_rate is not None and (part is None or not part[2].all()):
            other = separate_by_inputs(wg, bg, B, (fc.weight, fc.bias), model.fc2.weight, zero_rate)
            if other is not None:
                part = other if part is None else _merged(part, other, B)
        if zero_rate is not None and (part is None or not part[2].all()):
            known = None if part is None else (part[0][part[2]], part[1][part[2]])
            more = inputs_alone(wg, bg, B, zero_rate, model, known)
            part = part if more is None else _with_inputs(part, *more, B)
        parts.append(part)
    sep = torch.tensor([p is not None for p in parts])
    images = torch.zeros(n_batches * B, *model.spec.shape, device=counts.device)
    labels = counts.clone()
    failed = torch.zeros(n_batches * B, dtype=torch.bool)
    restarted = torch.zeros(n_batches * B, dtype=torch.bool)
    if sep.any():
        a2 = torch.cat([p[0] for p in parts if p is not None])
        d = torch.cat([p[1] for p in parts if p is not None])
        ok = torch.cat([p[2] for p in parts if p is not None]).cpu()
        keep = sep.nonzero().flatten()
        x = layers.pixels_from_fc_input(model, a2)
        if x is not None:  # the FC layer reads the pixels: each separated input is an image
            f, r = torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x), dtype=torch.bool)
        else:
            x, f, r = _search_separated(model, grads, keep, a2, d, B, steps, restarts, generator, public, progress)
        if layers.is_cnn(model):
            errors = output_errors(model, a2, d, ok).view(len(keep), B, -1)
            labels[keep] = separated_labels(errors, grads[layers.output_bias(model)][keep])
        idx = (keep[:, None] * B + torch.arange(B)).flatten()
        images[idx], failed[idx], restarted[idx] = x, f.cpu() | ~ok, r
    if (~sep).any():
        rest = (~sep).nonzero().flatten()
        sub = {k: v[rest] for k, v in grads.items()}
        x, _, f, r = cosine_search(model, sub, counts[rest], B, steps, generator, progress=progress)
        idx = (rest[:, None] * B + torch.arange(B)).flatten()
        images[idx], failed[idx], restarted[idx] = x, f.repeat_interleave(B).cpu(), r.repeat_interleave(B).cpu()
    return images, labels.reshape(-1), failed, restarted, sep


def _with_inputs(part, inputs, grads, B):
    """A separation (X^T (B, in), D (B, out), ok (B,)) or None, with the images found by inputs_alone (their inputs
    (k, in) and gradients (k, out), zero rows where not found) in its left-out slots, ok."""
    if part is None:
        part = (inputs.new_zeros(B, inputs.shape[1]), grads.new_zeros(B, grads.shape[1]),
                torch.zeros(B, dtype=torch.bool, device=inputs.device))
    Xt, D, ok = (p.clone() for p in part)
    slots = (~ok).nonzero().flatten()[:len(inputs)]
    Xt[slots], D[slots], ok[slots] = inputs[:len(slots)], grads[:len(slots)], True
    return Xt, D, ok


def _merged(part, other, B):
    """Of two separations of one batch, the one that found more (the first on a tie) with the images only the other
    found added to its left-out slots: each finds images the other misses (seed 0, B = 16: 14 and 14 images, 15
    together). Not a plain union: an input one of them found can be a near mixture of two (tuning seed 13,
    B = 16: SPEAR took one at cosine 0.996 to an image), which the other's exact input would then duplicate."""
    if other[2].sum() > part[2].sum():
        part, other = other, part
    found = other[2] & ~same_direction(other[0], part[0][part[2]]).any(1)
    return _with_inputs(part, other[0][found], other[1][found], B)


def _search_separated(model, grads, keep, a2, d, B, steps, restarts, generator, public, progress):
    """The feature search for the separated batches `keep`: (images, failed, restarted) for their B images each.
    The conv-gradient terms are the whole batch's; where images with a gradient of their own were left out
    (fc1's weight gradient not explained to 1e-3 by the separated images), the others cannot match them, and
    those batches match their fc1 inputs alone (tuning seed 14, B = 32: 64 % >= 30 dB against 22 %)."""
    name, fc = layers.first_fc(model)
    weight_grad = grads[name + '.weight'][keep]
    explained = torch.einsum('nbo,nbi->noi', d.view(len(keep), B, -1), a2.view(len(keep), B, -1)) / B
    whole = ((weight_grad - explained).flatten(1).norm(dim=1) <= 1e-3 * weight_grad.flatten(1).norm(dim=1)).cpu()
    x = torch.zeros(len(a2), *model.spec.shape, device=a2.device)
    failed, restarted = torch.zeros(len(a2), dtype=torch.bool), torch.zeros(len(a2), dtype=torch.bool)
    prior_image = None if public is None else public.mean(0)
    for group in (whole, ~whole):
        if group.any():
            rows = (group.nonzero().flatten()[:, None] * B + torch.arange(B)).flatten().to(a2.device)
            targets = [w[keep[group]] for w in conv_targets(model, grads)] if group is whole else []
            x[rows], _, f, r = feature_search(model, a2[rows], d[rows] @ fc.weight, targets, B, steps, restarts,
                                              generator, prior_image, progress)
            failed[rows.cpu()], restarted[rows.cpu()] = f.cpu(), r.cpu()
    return x, failed, restarted


def separated_labels(errors, bias_grad):
    """Each separated batch's labels (n, B) from its images' p - onehot(y), errors (n, B, classes), NaN rows where an
    image was not read: a read image's label is its only negative entry. The batch's output-bias gradient is
    mean_i (p_i - onehot(y_i)), so what is left of B times it once the read images' errors are taken out is the
    unread images' sum: its most negative class is one of their labels (iDLG's reading, for one); adding that
    label's one back, the next most negative is the next, and so on (so a label can repeat). Which unread image
    has which of these labels is not known (their images are flagged failed)."""
    read = errors.isfinite().all(2)
    labels = torch.where(read, torch.nan_to_num(errors, nan=0.0).argmin(2), -1)
    B = errors.shape[1]
    for b in (~read).any(1).nonzero().flatten().tolist():
        rest = B * bias_grad[b].to(errors.dtype) - errors[b][read[b]].sum(0)
        for i in (~read[b]).nonzero().flatten().tolist():
            labels[b, i] = rest.argmin()
            rest[labels[b, i]] += 1
    return labels


def invert(model, grads, method, batch_size, iterations=None, restarts=2, seed=0, progress=True, public=None):
    """Attack every intercepted gradient in `grads` ({name: (n_batches, *shape)}) -> Inversion.

    iterations: L-BFGS steps for dlg/idlg (default ITERATIONS), Adam steps for the default method
    (default STEPS, BATCH_STEPS for batches). public: public images of the same kind (the server's), for
    the default method: their mean image is one start of its search, and they predict the pixels the model
    never sees (unseen.py). Failed images are black and flagged, never passed off. The model is used in
    eval mode with its weights frozen, and left as it was.
    """
    if method not in METHODS:
        raise UserError(f'unknown --gi-method {method!r}: choose dlg, idlg or default')
    if method != 'default' and batch_size != 1:
        raise UserError(f'--gi-method {method} attacks single-image gradients: use --gi-batch-size 1')
    generator = torch.Generator().manual_seed(seed)
    prior_image = None if public is None else public.mean(0)
    with layers.frozen(model):
        if method != 'default':
            images, labels, failed, restarted = dlg_attack(model, grads, method, iterations or ITERATIONS, generator,
                                                           progress)
            return Inversion(images, labels, failed, restarted)
        if batch_size == 1:
            images, labels, _, failed, restarted = invert_single_images(model, grads, iterations or STEPS, restarts,
                                                                        generator, prior_image, progress)
        else:
            images, labels, failed, restarted, _ = invert_batches(model, grads, batch_size, iterations or BATCH_STEPS,
                                                                  restarts, generator, public, progress)
        if public is not None:
            images = fill_unseen(images, unseen_pixels(model), public)
    images = torch.where(failed[:, None, None, None].to(images.device), torch.zeros_like(images), images)
    return Inversion(images, labels, failed.cpu(), restarted.cpu())
