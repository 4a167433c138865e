"""Multi-step FedAvg updates attacked: Dimitrov et al. 2022 ("Data Leakage in Federated Averaging", TMLR).

A client's update after E epochs of SGD over its n images in batches of b is attacked by running that
training on dummy images, with client_update's arithmetic (same batches per epoch, same learning rate),
and moving the dummies until the simulated update points the way the real one does (1 - cosine, plus
total variation). The shuffle is unknown, so every epoch gets its own dummies in fixed batch slots; every
epoch sees the same n images, so an order-invariant prior ties the epochs together: each epoch's dummies
are matched to the epochs' mean by optimal assignment (within a label), and pulled towards it (L2). The
reconstruction is that mean. The client's dropout masks are unknown too; they are estimated with the
images (one continuous mask per image and epoch, starting at the expected mask), which the paper does not
do: on a tuning client (5 images, 5 epochs, round-1 model) it took the mean PSNR from 14.8 to 25.0 dB
(no dropout at all: 28.4 dB).

Labels: each class's count from the update's output bias. Over the client's steps t, that bias moves by
-lr * sum_t mean_{i in batch t} (p_i - onehot(y_i)), so the counts follow once the model's summed
confidence sum_t mean p is known; it is estimated by running the same local training on public images
that carry the counts found so far, until the counts stop changing (Dimitrov et al. estimate the FedSGD
label attack's parameters at every local step; this is that estimate for the count attack).
"""
import copy
import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.func import functional_call

from src.attacks.common import descend, total_variation
from src.attacks.gradient_inversion.invert import invert
from src.attacks.gradient_inversion.layers import flat, frozen, output_bias, param_names
from src.attacks.gradient_inversion.unseen import fill_unseen, unseen_pixels
from src.model import dropouts

# Chosen on tuning clients (client 0 / 1 of the standard preset on mnist-10k, images picked with seed 11; never
# seed 0's, which the benchmark reports), round 1's model: step sizes 0.1 / 0.2 / 0.3 for the images and 0.02 /
# 0.05 / 0.1 / 0.3 / 1 for the masks (5 images, 5 epochs, 500 steps: 0.2 / 0.05 best, 25.0 dB; the default 200
# steps keep the 50-image benchmark client under 3 minutes on 2 cores); TV 1e-3 vs 1e-4 moved the
# 50-image client by 0.4 dB at 200 steps (12.7 vs 12.3 dB), too little to tell.
LR, MASK_LR, TV_WEIGHT, PRIOR_WEIGHT, ALIGN_EVERY, STEPS = 0.2, 0.05, 1e-4, 1.0, 10, 200
MILESTONES = (0.6, 0.85)
LABEL_ITERATIONS = 4


def batch_slices(n, batch_size):
    """The batches client_update takes each epoch: consecutive slices of its shuffled images."""
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def local_training(model, start, epochs_x, epochs_y, batch_size, lr, create_graph=False, masks=None):
    """client_update's SGD on given images: epochs_x (E, n, C, H, W) holds each epoch's images in the order
    they are taken (batches are consecutive slices of batch_size), epochs_y (E, n) their labels. `start`:
    {name: weight}; the model's own weights are not used. masks (E, n, *dropout input): each image's dropout
    mask at each epoch, multiplied into the output of the model's `dropout` (which the caller keeps in eval
    mode), or None. Returns the weights after the last step, and the softmax summed over the steps of each
    step's batch mean (E * batches, classes), for the label counts. With create_graph the result is
    differentiable in epochs_x and masks."""
    names = param_names(model)
    buffers = dict(model.named_buffers())
    w = {k: start[k].detach().requires_grad_(True) for k in names}
    confidence, mask = [], {}
    hook = None if masks is None else dropout_layer(model).register_forward_hook(lambda m, i, out: out * mask['now'])
    try:
        for e, (x, y) in enumerate(zip(epochs_x, epochs_y)):
            for sl in batch_slices(len(y), batch_size):
                if masks is not None:
                    mask['now'] = masks[e, sl]
                logits = functional_call(model, ({**w, **buffers}), (x[sl],))
                confidence.append(logits.detach().softmax(1).mean(0))
                g = torch.autograd.grad(F.cross_entropy(logits, y[sl]), list(w.values()), create_graph=create_graph)
                w = {k: torch.add(v, gk, alpha=-lr) for (k, v), gk in zip(w.items(), g)}  # torch.optim.SGD's arithmetic
                if not create_graph:
                    w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    finally:
        if hook is not None:
            hook.remove()
    return {k: v if create_graph else v.detach() for k, v in w.items()}, torch.stack(confidence)


def _integer_counts(expected, n):
    """Non-negative integer counts summing to n, closest to `expected` (largest remainder)."""
    e = expected.clamp_min(0)
    e = e * n / e.sum().clamp_min(1e-12) if e.sum() > 0 else torch.full_like(e, n / len(e))
    counts = e.floor().long()
    for c in (e - counts).argsort(descending=True)[:n - int(counts.sum())]:
        counts[c] += 1
    return counts


def estimate_label_counts(model, start, bias_update, n, epochs, batch_size, lr, public_x, public_y, generator):
    """How many of the client's n images carry each class, from its update's output-bias change.

    sum_t mean_batch(onehot(y)) = sum_t mean_batch(p) + bias_update / lr; with each image once per epoch in a
    batch of about b = n / batches, the left side is counts * epochs * batches / n. The model's confidence
    sum_t mean p is measured by running the client's training on public images with the current counts
    (start: uniform), LABEL_ITERATIONS times. Returns (classes,) int64."""
    classes = len(bias_update)
    batches = len(batch_slices(n, batch_size))
    counts = _integer_counts(torch.ones(classes), n)
    pools = [(public_y.cpu() == c).nonzero().flatten() for c in range(classes)]
    for _ in range(LABEL_ITERATIONS):
        pick = torch.cat([pools[c][torch.randint(len(pools[c]), (int(k),), generator=generator)]
                          for c, k in enumerate(counts.tolist()) if k and len(pools[c])])
        if len(pick) < n:  # a class the public data lacks: fill with any public images
            pick = torch.cat([pick, torch.randint(len(public_y), (n - len(pick),), generator=generator)])
        order = torch.stack([pick[torch.randperm(n, generator=generator)] for _ in range(epochs)])
        with frozen(model):
            _, confidence = local_training(model, start, public_x[order], public_y[order], batch_size, lr)
        expected = (confidence.sum(0).cpu() + bias_update.cpu() / lr) * n / (epochs * batches)
        new = _integer_counts(expected, n)
        if torch.equal(new, counts):
            break
        counts = new
    return counts


def _aligned(x, slots):
    """x (E, n, ...) epoch-major dummies; slots (E, n): the slot of each image in each epoch -> (E, n, ...)
    with the same image at the same index in every epoch."""
    return torch.stack([xe[s] for xe, s in zip(x, slots)])


def _align(x, slot_labels, labels, slots):
    """Each epoch's dummies assigned to the images of the epochs' current mean by optimal assignment on
    squared distance, within a label. Returns the new slots (E, n)."""
    ref = _aligned(x, slots).mean(0)
    new = slots.clone()
    for e in range(len(x)):
        cost = (x[e][:, None] - ref[None]).pow(2).flatten(2).sum(2).cpu()
        cost = cost + 1e9 * (slot_labels[e][:, None] != labels[None])
        rows, cols = linear_sum_assignment(cost.numpy())
        new[e, torch.as_tensor(cols)] = torch.as_tensor(rows)
    return new


def invert_fedavg(model, start, delta, n, epochs, batch_size, lr, steps, generator, public_x, public_y,
                  iterations=None, restarts=2, progress=None):
    """Images and labels of a client's n images from its update `delta` ({name: tensor}) after `epochs`
    epochs of batch_size at lr from the weights `start`. One local step is one gradient of all n images
    (delta = -lr * gradient): that is FedSGD, attacked exactly by the default attack; more steps by the
    simulation (`steps` Adam steps). iterations/restarts: the default attack's. Returns (images (n, C, H, W),
    labels (n,), failed (n,) bool)."""
    if epochs == 1 and batch_size >= n:
        at_start = copy.deepcopy(model)
        at_start.load_state_dict({**at_start.state_dict(), **start})
        inv = invert(at_start, {k: (-v / lr)[None] for k, v in delta.items()}, 'default', n, iterations, restarts,
                     _seed(generator), progress=False, public=public_x)
        return inv.images, inv.labels, inv.failed
    device = delta[output_bias(model)].device
    counts = estimate_label_counts(model, start, delta[output_bias(model)], n, epochs, batch_size, lr,
                                   public_x, public_y, generator)
    labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
    # slot s of epoch e holds image perm[e, s]: each epoch's batches mix the labels as a shuffle does
    perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(epochs)])
    slot_labels = labels[perm]
    slot_labels_on_device = slot_labels.to(device)
    x0 = (0.1 * torch.rand(n, *model.spec.shape, generator=generator))[perm].to(device)
    # the dropout masks are unknown: each image's mask at each epoch is estimated with the images, as
    # sigmoid(logit) / keep, starting at 1 (the expected mask, eval mode's forward)
    layer = dropout_layer(model)
    keep = 1 - layer.p if layer is not None else 1
    mask_logits, extra = None, []
    if keep < 1:
        mask_logits = torch.full((epochs, n, *_dropout_input_shape(model, x0[0, :1])), math.log(keep / (1 - keep)),
                                 device=device, requires_grad=True)
        extra = [(mask_logits, MASK_LR)]
    target = flat({k: v[None] for k, v in delta.items()})[0]
    state = {'slots': perm.argsort(1)}  # slots[e, i]: the slot of image i in epoch e (on the CPU, as the matching)

    def loss(x, step):  # x: (1, E, n, C, H, W), one problem
        x = x[0]
        if step and step % ALIGN_EVERY == 0:
            state['slots'] = _align(x.detach(), slot_labels, labels, state['slots'])
        masks = None if mask_logits is None else torch.sigmoid(mask_logits) / keep
        w, _ = local_training(model, start, x, slot_labels_on_device, batch_size, lr, True, masks)
        sim = flat({k: (w[k] - start[k])[None] for k in delta})[0]
        aligned = _aligned(x, state['slots'])
        tie = (aligned - aligned.mean(0).detach()).pow(2).mean()
        return (1 - F.cosine_similarity(sim, target, 0, eps=1e-30)
                + TV_WEIGHT * total_variation(x.flatten(0, 1)).sum() + PRIOR_WEIGHT * tie)[None]

    with frozen(model):
        x, diverged = descend(x0[None], loss, steps, LR, milestones=MILESTONES, progress=progress, extra=extra)
    slots = state['slots']
    x, failed = x[0], bool(diverged[0])
    images = _aligned(x, slots).mean(0)
    failed = failed or not math.isfinite(images.sum().item())
    if not failed:  # as the default attack: pixels the model never sees, predicted from public images
        images = fill_unseen(images, unseen_pixels(model), public_x)
    return (torch.zeros_like(images) if failed else images), labels.to(device), torch.full((n,), failed)


def dropout_layer(model):
    """The model's one dropout layer (every model in src.model has one), or None: then no mask is estimated."""
    layers = dropouts(model)
    return layers[0] if len(layers) == 1 else None


def _dropout_input_shape(model, x):
    """The shape of one image's input to the model's dropout, from one forward."""
    seen = []
    hook = dropout_layer(model).register_forward_hook(lambda m, i, out: seen.append(out.shape[1:]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return seen[0]


def _seed(generator):
    return int(torch.randint(2 ** 31, (1,), generator=generator))
