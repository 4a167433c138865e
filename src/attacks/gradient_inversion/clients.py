"""The clients' side of the gradient attack: which of their images are attacked, and the gradient each
client computes on them and sends (after its defenses; under secure aggregation only the mean reaches
the server). Nothing here is the attacker's: it runs in Attack.observe, on the clients' data."""
import numpy as np
import torch
import torch.nn.functional as F

from src.defenses import defend_gradients
from src.utils import UserError, autocast


def pick_images(client_indices, n, seed):
    """n distinct training images of the clients, picked by seed: a client at random, then one of its
    images. Returns (indices into the training set (n,), owning client of each)."""
    rng = np.random.default_rng(seed)
    clients = [c for c, idx in enumerate(client_indices) if len(idx)]
    total = sum(len(client_indices[c]) for c in clients)
    if n > total:
        raise UserError(f'asked for {n} images to attack but the clients hold only {total}')
    chosen, owners = [], []
    while len(chosen) < n:
        c = int(rng.choice(clients))
        i = int(rng.choice(client_indices[c]))
        if i not in chosen:
            chosen.append(i)
            owners.append(c)
    return np.array(chosen), owners


def clients_per_gradient(cfg):
    """How many clients' gradients the server receives as one mean: all of the round's under secure
    aggregation (the mean of K one-batch gradients is the gradient of one K-batch), else 1."""
    return cfg.get('num_clients', 1) if cfg.get('secure_aggregation') else 1


def client_gradients(model, images, labels, batch_size, dropout, precision='fp32', seed=0, per_example=False):
    """The gradients clients compute: one per consecutive group of `batch_size` images.

    Each is the gradient of the mean cross-entropy over its batch under `model`, computed the way
    a client does it: train mode when `dropout` (a fresh random mask the server never sees), else
    eval mode. Returns {name: (n_batches, *shape)} in fp32; with per_example, each example's own
    gradient under the same masks instead, {name: (n_batches, batch_size, *shape)} (what DP-SGD clips).
    """
    n = len(labels) // batch_size
    params = [p for _, p in model.named_parameters()]
    was_training = model.training
    model.train(dropout)
    torch.manual_seed(seed)  # the dropout masks
    out = []
    for b in range(n):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        if not per_example:
            with autocast(images.device, precision):
                loss = F.cross_entropy(model(images[sl]), labels[sl])
            out.append([g.detach().float() for g in torch.autograd.grad(loss, params)])
            continue
        # one forward for the batch (its masks, as the batch gradient's), then one backward per example:
        # examples do not interact (no batch norm), so each gets exactly its own gradient
        with autocast(images.device, precision):
            losses = F.cross_entropy(model(images[sl]), labels[sl], reduction='none')
        each = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
        out.append([torch.stack([g[i] for g in each]).detach().float() for i in range(len(params))])
    model.train(was_training)
    return {name: torch.stack([o[i] for o in out]) for i, (name, _) in enumerate(model.named_parameters())}


def sent_gradients(model, images, labels, batch_size, dropout, cfg, precision='fp32', seed=0):
    """What the server receives for these images: each client's gradient on its batch of
    `batch_size`, defended as `cfg` says (DP-SGD clips every example's gradient, so those are
    computed when it is on), then under secure aggregation averaged over each consecutive group of
    clients_per_gradient(cfg) clients. Returns {name: (n_received, *shape)}."""
    examples = None
    if cfg.get('dp_noise_multiplier', 0) > 0 and batch_size > 1:
        examples = client_gradients(model, images, labels, batch_size, dropout, precision, seed + 1, per_example=True)
        grads = {k: v.mean(1) for k, v in examples.items()}
    else:
        grads = client_gradients(model, images, labels, batch_size, dropout, precision, seed + 1)
        if cfg.get('dp_noise_multiplier', 0) > 0:
            examples = {k: v[:, None] for k, v in grads.items()}  # one example: its gradient is the batch's
    grads = defend_gradients(grads, cfg, torch.Generator().manual_seed(seed + 2), examples)
    k = clients_per_gradient(cfg)
    if k > 1:
        grads = {name: g.view(-1, k, *g.shape[1:]).mean(1) for name, g in grads.items()}
    return grads
