"""How much leaked, measured against the clients' images (Attack.score only): each reconstruction paired
with its original, PSNR/SSIM/MSE, labels, the recovered fractions, and the no-attack baselines."""
import numpy as np
import torch

from src.attacks.common import RECOVERED_DB, recovered_fractions
from src.metrics import mse, psnr, ssim
from src.plots import as_pixels


def match_to_originals(recon, labels, originals, batch_size):
    """Within each batch, pair reconstructions with originals by optimal assignment on MSE (the order
    inside a batch is unknowable from its gradient)."""
    if batch_size == 1:
        return recon, labels
    from scipy.optimize import linear_sum_assignment
    recon, labels = recon.clone(), labels.clone()
    for s in range(0, len(recon), batch_size):
        r, o = recon[s:s + batch_size], originals[s:s + batch_size]
        cost = (r[:, None] - o[None]).pow(2).flatten(2).mean(2).cpu().numpy()  # (recon, original)
        rows, cols = linear_sum_assignment(cost)
        order = torch.as_tensor(rows[np.argsort(cols)], device=recon.device)
        recon[s:s + batch_size] = r[order]
        labels[s:s + batch_size] = labels[s:s + batch_size][order]
    return recon, labels


def label_count_accuracy(true, recovered, batch_size):
    """Fraction of labels recovered, per batch as multisets (order inside a batch is unknowable)."""
    hits = 0
    for s in range(0, len(true), batch_size):
        classes = int(max(true.max(), recovered.max())) + 1
        t = torch.bincount(true[s:s + batch_size], minlength=classes)
        r = torch.bincount(recovered[s:s + batch_size], minlength=classes)
        hits += torch.minimum(t, r).sum().item()
    return hits / len(true)


def exact_count_batches(true, recovered, batch_size):
    """Share of batches whose recovered labels are exactly the true ones as a multiset."""
    return float(torch.tensor([torch.equal(t.sort().values, r.sort().values)
                               for t, r in zip(true.split(batch_size), recovered.split(batch_size))]).float().mean())


def score_case(originals, inversion, true_labels, batch_size, owners=None):
    """One dropout case scored: (reconstructions in the originals' order, their labels, metrics)."""
    recon, labels = match_to_originals(inversion.images, inversion.labels, originals, batch_size)
    p, s, e = psnr(recon, originals), ssim(recon, originals), mse(recon, originals)
    owners = owners if owners is not None else [None] * len(originals)
    return recon, labels, {
        'psnr_mean': p.mean().item(), 'psnr_min': p.min().item(),
        'ssim_mean': s.mean().item(), 'ssim_min': s.min().item(),
        'mse_mean': e.mean().item(), 'mse_max': e.max().item(),
        **recovered_fractions(p),
        'recovered_threshold_db': list(RECOVERED_DB),
        'label_accuracy': label_count_accuracy(true_labels, labels, batch_size),
        'n_failed': int(inversion.failed.sum()),
        'n_restarted': int(inversion.restarted.sum()),
        'per_image': [{'true_label': int(t), 'recovered_label': int(r), 'psnr': pi.item(), 'ssim': si.item(),
                       'mse': ei.item(), 'failed': bool(f), 'restarted': bool(rs), 'client': c}
                      for t, r, pi, si, ei, f, rs, c in zip(true_labels, labels, p, s, e, inversion.failed,
                                                            inversion.restarted, owners)],
    }


def baselines(originals, public_mean):
    """PSNR of two guesses that use no gradient: flat gray, and the public data's mean image."""
    return {'gray_0.5_psnr_mean': psnr(torch.full_like(originals, 0.5), originals).mean().item(),
            'dataset_mean_psnr_mean': psnr(public_mean.expand_as(originals), originals).mean().item()}


def score_rounds(attacked, private, public_mean):
    """The FedAvg-rounds dummies scored: each dummy's PSNR to the client's real image it resembles most
    (optimal assignment, distinct images), next to two guesses that use no update: the public mean
    image (against the client images nearest to it), and a black image (the best dummy's score is only
    meaningful above that one's). A secure aggregate is scored against all clients' images.
    Returns (rounds metrics, shown: [(round, best dummy, its real image, PSNR)] of each round's first update).
    """
    from scipy.optimize import linear_sum_assignment
    rounds, shown = [], []
    for rd in attacked['rounds']:
        dummies = rd['labels'].shape[1]
        row = {'round': rd['round'], 'clients': []}
        for j, client in enumerate(rd['clients']):
            real = (private.clients() if client is None else private.client(client))[0]
            rec = rd['images'][j * dummies:(j + 1) * dummies].to(real.device)
            cost = (rec[:, None] - real[None]).pow(2).flatten(2).mean(2)  # (dummies, client images)
            r, c = linear_sum_assignment(cost.cpu().numpy())
            p = psnr(rec[r], real[c])
            nearest = (public_mean - real).pow(2).flatten(1).mean(1).topk(dummies, largest=False).indices
            base = psnr(public_mean.expand(dummies, -1, -1, -1), real[nearest])
            blank = psnr(torch.zeros_like(real), real).max()  # a black image vs the client's sparsest digit
            row['clients'].append({'client': client, 'client_images': len(real), 'failed': bool(rd['failed'][j]),
                                   'psnr_mean': p.mean().item(), 'psnr_max': p.max().item(),
                                   # the share of the client's images some dummy recovered
                                   **{k: v * len(p) / len(real) for k, v in recovered_fractions(p).items()},
                                   'mean_image_psnr_mean': base.mean().item(), 'black_image_psnr_max': blank.item(),
                                   'dummy_labels': rd['labels'][j].tolist()})
            if j == 0:
                shown.append((rd['round'], as_pixels(rec[r][p.argmax()]), as_pixels(real[c][p.argmax()]),
                              p.max().item()))
        for key in ('psnr_mean', 'psnr_max', 'mean_image_psnr_mean', 'black_image_psnr_max'):
            row[key] = float(np.mean([c[key] for c in row['clients']]))
        rounds.append(row)
    return rounds, shown
