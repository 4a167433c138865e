"""The recorded FedAvg updates attacked (--gi-rounds): Geiping et al. 2020's multi-step attack on the
server's own record of what clients sent (view.captured), every client of every captured round.

A client's update is many local SGD steps (epochs x batches) on hundreds of images. As Geiping et
al. 2020, the local training is simulated differentiably on a few dummy images per client
(`local_steps` full-batch SGD steps at the recorded learning rate; default: one per local epoch,
i.e. the client's epochs over a dummy set smaller than one batch), and the dummies are optimised so
that the simulated update points the way the recorded one does (cosine + TV), all clients of a
round as one batch. Dummy labels come from the update's last-layer bias (LLG-style counts). With
secure aggregation the record holds only the round's aggregate: it is attacked as one update.
Scoring against the clients' images is scoring.score_rounds.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from src.attacks.common import descend, total_variation
from src.attacks.gradient_inversion.layers import clients_logits, flat, output_bias, param_names
from src.attacks.gradient_inversion.labels import recover_labels

LR, TV_WEIGHT = 0.05, 1e-4


def simulate_updates(model, global_w, x, labels, local_steps, lr):
    """Each client's update after `local_steps` SGD steps of `model` on its dummy batch, differentiable in x."""
    w = {k: v.expand(x.shape[0], *v.shape).clone().requires_grad_(True) for k, v in global_w.items()}
    for _ in range(local_steps):
        logits = clients_logits(model, w, x)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction='none').view(labels.shape)
        g = torch.autograd.grad(loss.mean(1).sum(), list(w.values()), create_graph=True)
        w = {k: v - lr * gk for (k, v), gk in zip(w.items(), g)}
    return {k: w[k] - global_w[k] for k in global_w}


def invert_updates(model, global_w, deltas, labels, local_steps, lr, steps, generator, tv_weight=TV_WEIGHT):
    """Dummy images whose simulated local training gives an update of the same direction as the recorded
    one (1 - cosine + TV), all clients as one batch, from small noise.
    deltas: {name: (C, *shape)}; labels (C, B). Returns (images (C*B, C, H, W), diverged (C,))."""
    C, B = labels.shape
    target = flat(deltas)
    x0 = (0.1 * torch.rand(C, B, *model.spec.shape, generator=generator)).to(target.device)

    def distance(x, step):
        sim = flat(simulate_updates(model, global_w, x, labels, local_steps, lr))
        return (1 - F.cosine_similarity(sim, target, dim=1, eps=1e-30)
                + tv_weight * total_variation(x.flatten(0, 1)).view(C, B).sum(1))

    x, diverged = descend(x0, distance, steps, LR)
    return x.flatten(0, 1), diverged


def invert_rounds(model, captured, dummies, steps, seed, local_steps=None, device='cpu', progress=True):
    """Every recorded update of every captured round attacked. captured: the server's record
    (view.captured); model: the architecture they trained (its weights are not used). Returns
    {'local_steps': ..., 'rounds': [{'round', 'clients' (the client of each update, None for a secure
    aggregate), 'images' (U*dummies, C, H, W), 'labels' (U, dummies),
    'failed' (U,)}]}."""
    meta = captured['meta']
    local_steps = local_steps or int(meta.get('local_epochs') or 1)
    generator = torch.Generator().manual_seed(seed)
    names = param_names(model)
    rounds = []
    for rd in tqdm(captured['rounds'], desc='gradient inversion (FedAvg rounds)', unit='round', disable=not progress):
        if 'crafted' in rd:  # a malicious server's round: the malicious_server attack reads it out
            continue
        global_w = {k: rd['global_state'][k].float().contiguous().to(device) for k in names}
        sent = rd.get('updates') or [{'client': None, **rd['aggregate']}]
        deltas = {k: torch.stack([u['delta'][k].float().to(device) for u in sent]) for k in names}
        labels = recover_labels(-deltas[output_bias(model)], dummies)  # the update is minus lr times summed gradients
        images, failed = invert_updates(model, global_w, deltas, labels, local_steps, meta['learning_rate'], steps,
                                        generator)
        rounds.append({'round': rd['round'], 'clients': [u['client'] for u in sent], 'images': images,
                       'labels': labels, 'failed': failed})
    return {'local_steps': local_steps, 'rounds': rounds}
