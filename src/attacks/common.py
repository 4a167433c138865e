"""What every attack uses: the projected descent loop with divergence detection, total variation, the
identity losses, best-restart selection, and the recovered fraction at a PSNR threshold."""
import torch
import torch.nn.functional as F
from tqdm import tqdm

# A reconstruction counts as "recovered" at or above these PSNRs to its matched original (pixels in
# [0, 1]): 25 dB is a recognisable copy of a digit, 30 dB one hard to tell from the original by eye.
RECOVERED_DB = (25.0, 30.0)


def descend(x, loss_fn, steps, lr, optimizer='adam', bounds=(0.0, 1.0), milestones=(), progress=None,
            narrow=None, extra=()):
    """Minimise loss_fn(x, step) -> one loss per row of x, keeping x in `bounds` after every step.

    Rows are independent problems solved as one batch: the summed loss gives each row exactly its own
    gradient. A row whose loss turns non-finite is left out of the step (its gradient zeroed) and flagged,
    so one diverging row cannot poison the others. optimizer: 'adam', or 'sgd-nesterov' (momentum 0.9, as
    GMI's latent search). milestones: fractions of the steps at which the step size is cut 5x. progress: a
    tqdm description (shown), or None. narrow=(step, choose): at that step only the rows choose(x) returns
    go on, with their optimiser state, so the rest of the steps cost less; loss_fn must accept the
    narrower x. extra: (tensor, step size) pairs of unbounded leaf tensors that loss_fn uses and that are
    optimised alongside x, in place (the FedAvg attack's dropout masks). Returns (x detached, diverged (rows,)
    bool).
    """
    x = x.detach().clone().requires_grad_(True)
    groups = [{'params': [x]}, *({'params': [t], 'lr': t_lr} for t, t_lr in extra)]
    opt = (torch.optim.Adam(groups, lr=lr) if optimizer == 'adam' else
           torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True))
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, [int(steps * m) for m in milestones], 0.2)
             if milestones else None)
    diverged = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for step in tqdm(range(steps), desc=progress, unit='step', leave=False, disable=progress is None):
        if narrow is not None and step == narrow[0]:
            rows = narrow[1](x.detach())
            state = opt.state.pop(x, {})  # none yet when narrowing at step 0
            x = x.detach()[rows].requires_grad_(True)
            opt.param_groups[0]['params'] = [x]
            opt.state[x] = {k: v[rows] if torch.is_tensor(v) and v.dim() else v for k, v in state.items()}
            diverged = diverged[rows]
        loss = loss_fn(x, step)
        bad = ~torch.isfinite(loss)
        diverged |= bad
        opt.zero_grad(set_to_none=True)
        loss.masked_fill(bad, 0).sum().backward()
        with torch.no_grad():
            for t in (x, *(t for t, _ in extra)):
                t.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            x.clamp_(*bounds)
    diverged |= ~torch.isfinite(x.detach()).flatten(1).all(1)
    return x.detach(), diverged


def total_variation(x):
    """Mean absolute difference between neighbouring pixels, vertical plus horizontal, per image: (N,)."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
            + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1))


def identity_loss(logits, classes, kind):
    """Per-image loss to minimise for making the model see `classes`: 'ce' (cross-entropy, as Fredrikson
    et al. and GMI publish it; its gradient vanishes once the model is sure) or 'logit' (the negative
    target logit, Nguyen et al. 2023: it does not saturate)."""
    if kind == 'ce':
        return F.cross_entropy(logits, classes, reduction='none')
    if kind == 'logit':
        return -logits.gather(1, classes[:, None]).squeeze(1)
    raise ValueError(f"unknown identity loss {kind!r}: use 'ce' or 'logit'")


def best_restart(score):
    """Per class, the restart with the highest score (C, R) -> (C,): chosen by what the attacker sees
    (the target model's confidence), never by the evaluation classifiers."""
    return torch.as_tensor(score).argmax(1)


def recovered_fractions(psnr_values, thresholds=RECOVERED_DB):
    """{'recovered_25db': f, 'recovered_30db': f}: the fraction of reconstructions at or above each PSNR."""
    p = torch.as_tensor(psnr_values, dtype=torch.float32)
    return {f'recovered_{t:g}db': int((p >= t).sum()) / len(p) if len(p) else 0.0 for t in thresholds}


def class_halves(num_classes):
    """The class-disjoint protocol (as the GAN attack's): the server's public data holds the upper half of the
    classes (5-9 of 10) only, the lower half (0-4) is attacked. Returns (attacked, public)."""
    return list(range(num_classes // 2)), list(range(num_classes // 2, num_classes))
