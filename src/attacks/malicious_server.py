"""The malicious server's read-out: every crafted round in captured_updates.pt, image by image.

main.py --server malicious (src/malicious.py) sends clients a crafted model on the rounds it names and
records their updates. run() reads each bin of each update back into an image (from the server's record
alone) and says which bins hold one image (claimed) and which a collision; score() matches the claimed
images to the clients' private images by PSNR, beside the ideal (images alone in a bin of the crafted
model, what a read-out without drift or rounding would get) and a server without the attack (the nearest
public image).
"""
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from src.attacks import common  # noqa: E402
from src.attacks.base import Attack, Report  # noqa: E402
from src.malicious import read_imprint  # noqa: E402
from src.model import CNN  # noqa: E402
from src.utils import atomic_path  # noqa: E402

RECOVERED_DB = 40.0          # "verbatim": RMS error at most 1 % of the pixel range
FIGURE = 'malicious_server.png'


def crafted_rounds(captured):
    return [rd for rd in (captured or {}).get('rounds', []) if isinstance(rd.get('crafted'), dict)]


def read_fc1(delta, crafted_state, steps=100):
    """Trap rows: each moved fc1 row is a multiple of one image's conv features (or a blend); the image is
    estimated by matching the crafted conv stack's features in direction (the scale is unknown).
    Returns {'rows', 'images', 'claimed'}: claimed where the estimate's features match (cos >= 0.999)."""
    dW = delta['fc1.weight'].double().cpu()
    index = (dW != 0).any(1).nonzero().squeeze(1)
    target = dW[index].float()
    target = target * torch.where(target.sum(1, keepdim=True) < 0, -1.0, 1.0)
    model = CNN()
    model.load_state_dict({k: v for k, v in crafted_state.items()})
    model.eval().requires_grad_(False)
    unit = target / target.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def loss(x, step):
        f = model.features(x)
        return 1 - (f * unit[:len(x)]).sum(1) / f.norm(dim=1).clamp_min(1e-12)

    x0 = torch.full((len(index), 1, 28, 28), 0.1)
    x, _ = common.descend(x0, loss, steps, 0.05) if len(index) else (x0, None)
    with torch.no_grad():
        cos = 1 - loss(x, 0) if len(index) else torch.zeros(0)
    return {'rows': index, 'images': x, 'claimed': cos >= 0.999, 'feature_cos': cos}


def best_psnr(recovered, private, chunk=2048):
    """For each private image, the best PSNR over `recovered` and which one: ((n,), (n,) index or -1)."""
    n = len(private)
    best = torch.full((n,), -float('inf'), dtype=torch.float64)
    which = torch.full((n,), -1, dtype=torch.int64)
    if len(recovered) == 0 or n == 0:
        return best, which
    p = private.flatten(1).double().cpu()
    pn = p.square().sum(1)
    for start in range(0, len(recovered), chunk):
        r = recovered[start:start + chunk].flatten(1).double().cpu()
        mse = ((r.square().sum(1)[:, None] + pn[None] - 2 * r @ p.T) / p.shape[1]).clamp_min(1e-10)
        db = 10 * torch.log10(1 / mse)
        top, arg = db.max(0)
        better = top > best
        best = torch.where(better, top, best)
        which = torch.where(better, arg + start, which)
    return best, which


def ideal_alone(params, private_x, rows=None, crafted_state=None):
    """(n,) bool: the private images alone in at least one bin of the crafted model (before training).

    Imprint bins: an image is in row i's bin when lower_i <= w_group . x < upper_i. fc1 traps: row i
    lets x through when its pre-activation is positive."""
    x = private_x.flatten(1).double().cpu()
    if params['attack'] == 'fc1':
        model = CNN()
        model.load_state_dict(crafted_state)
        model.eval()
        with torch.no_grad():
            active = (model.fc1(model.features(private_x.cpu())) > 0)
        return (active & (active.sum(0, keepdim=True) == 1)).any(1)
    lo, hi = rows if rows is not None else (0, len(params['lower']))
    lower, group = params['lower'][lo:hi], params['group'][lo:hi]
    alone = torch.zeros(len(x), dtype=torch.bool)
    for k in range(params['groups']):
        mine = (group == k).nonzero().squeeze(1)
        if len(mine) == 0:
            continue
        m = x @ params['directions'][k].double()
        b = (torch.searchsorted(lower[mine].contiguous(), m, right=True) - 1).clamp_min(0)
        counts = torch.bincount(b, minlength=len(mine))
        alone |= counts[b] == 1
    return alone


class MaliciousServer(Attack):
    name = 'malicious'
    key = 'malicious_server'
    title = 'Malicious server: images read out of crafted-model updates (Robbing the Fed, LOKI, trap rows)'
    figures = (FIGURE,)
    headline = (('recovered_40db', 'client images recovered verbatim (>= 40 dB)', 'fraction'),
                ('ideal', 'ideal: client images alone in a bin', 'fraction'),
                ('no_attack_baseline.recovered_40db', 'no attack: nearest public image at >= 40 dB', 'fraction'),
                ('readout_seconds', 'read-out time', 'seconds'))

    def run(self, view, settings):
        """Read out every crafted round in the server's record: {'reads': [{round, client ('aggregate'
        under secure aggregation with shared bins), attack, read}], 'readout_seconds', 'skipped'}."""
        started = time.perf_counter()
        rounds = crafted_rounds(view.captured)
        reads = []
        for rd in rounds:
            params = rd['crafted']
            sources = ([(u['client'], u['delta']) for u in rd['updates']] if 'updates' in rd
                       else [('aggregate', rd['aggregate']['delta'])])
            for who, delta in sources:
                shares = params.get('client_rows')
                if params['attack'] == 'fc1':
                    parts = [(who, read_fc1(delta, rd['global_state']))]
                elif shares and who == 'aggregate':  # loki under secure aggregation: each share is one client's
                    parts = [(c, read_imprint(delta, params, rows)) for c, rows in enumerate(shares)]
                else:
                    parts = [(who, read_imprint(delta, params, shares[who] if shares else None))]
                reads += [{'round': rd['round'], 'client': c, 'attack': params['attack'], 'read': read}
                          for c, read in parts]
        return {'reads': reads, 'rounds': [rd['round'] for rd in rounds],
                'readout_seconds': time.perf_counter() - started,
                'skipped': None if rounds else 'no crafted round in captured_updates.pt (train with '
                                                '--server malicious); nothing to read out'}

    def score(self, result, private, truth, view, settings, out_dir):
        rounds = {rd['round']: rd for rd in crafted_rounds(view.captured)}
        clients = sorted({c for r in result['reads'] for c in (
            range(len(private.client_indices)) if r['client'] == 'aggregate' else [r['client']])})
        # every client image in a crafted round is a target, counted once however often it is recovered
        targets = {c: private.client(c)[0] for c in clients}
        best = {c: torch.full((len(targets[c]),), -float('inf'), dtype=torch.float64) for c in clients}
        ideal = {c: torch.zeros(len(targets[c]), dtype=torch.bool) for c in clients}
        per_round, examples = [], []
        for r in result['reads']:
            rd, read = rounds[r['round']], r['read']
            params = rd['crafted']
            who = clients if r['client'] == 'aggregate' else [r['client']]
            images = torch.cat([targets[c] for c in who])
            claimed = read['images'][read['claimed']]
            db, which = best_psnr(claimed, images)
            shares = params.get('client_rows')
            alone = ideal_alone(params, images, shares[r['client']] if shares and r['client'] != 'aggregate'
                                else None, rd['global_state'])
            start = 0
            for c in who:
                n = len(targets[c])
                best[c] = torch.maximum(best[c], db[start:start + n])
                ideal[c] |= alone[start:start + n]
                start += n
            rate = float((db >= RECOVERED_DB).double().mean()) if len(db) else 0.0
            per_round.append({'round': r['round'], 'client': r['client'], 'attack': r['attack'],
                              'images': len(images), 'bins_moved': len(read['rows']),
                              'claimed': int(read['claimed'].sum()),
                              'collisions': int((~read['claimed']).sum()),
                              'recovered_40db': rate, 'ideal': float(alone.double().mean()) if len(alone) else 0.0,
                              'claimed_below_40db': int((best_psnr(images, claimed)[0] < RECOVERED_DB).sum())
                              if len(claimed) else 0})
            hits = (db >= RECOVERED_DB).nonzero().squeeze(1)[:8]
            examples += [(images[i], claimed[which[i]], f"r{r['round']} c{r['client']} {db[i]:.0f} dB") for i in hits]
        total = sum(len(v) for v in targets.values())
        recovered = sum(int((best[c] >= RECOVERED_DB).sum()) for c in clients)
        baseline = self.no_attack(view, private, clients)
        metrics = {
            'recovered_40db': recovered / total if total else 0.0,
            'ideal': sum(int(ideal[c].sum()) for c in clients) / total if total else 0.0,
            'client_images': total,
            'crafted_rounds': result['rounds'],
            'per_round_client': per_round,
            'no_attack_baseline': baseline,
            'readout_seconds': result['readout_seconds'],
            'threshold_db': RECOVERED_DB,
            'threat_model': {
                'attacker': 'malicious server: on the crafted rounds it sends a crafted model instead of the '
                            'global model (src/malicious.py) and does not aggregate the updates',
                'changed': self.changed(rounds),
                'knows': 'the protocol it announced (learning rate, batch size, local epochs), the clients\' '
                         'sample counts, its public data (the test split: measurement directions and bin '
                         'quantiles), that images are 8-bit',
                'does_not_know': 'the clients\' images and labels, their shuffling, their dropout masks',
                'scoring_only': "the clients' private images (each matched to its best read-out by PSNR)"},
            'seed': settings.seed,
        }
        if result['skipped']:
            metrics['skipped'] = result['skipped']
            metrics['summary'] = result['skipped']
        else:
            metrics['summary'] = (f"{metrics['recovered_40db']:.1%} of {total} client images recovered at >= "
                                  f"{RECOVERED_DB:g} dB from crafted rounds {result['rounds']} (ideal "
                                  f"{metrics['ideal']:.1%}; no attack {baseline['recovered_40db']:.1%})")
        self.figure(out_dir, per_round, examples, metrics)
        return Report(metrics)

    @staticmethod
    def changed(rounds):
        out = {}
        for r, rd in rounds.items():
            p = rd['crafted']
            out[str(r)] = ({'attack': 'fc1', 'what': f"fc1's {p['rows']} rows: trap rows (random directions, "
                                                     f"bias at the {p['quantile']:.4f} quantile)"}
                           if p['attack'] == 'fc1' else
                           {'attack': p['attack'], 'what': f"an imprint block of {p['bins']} bins in {p['groups']} "
                                                           f"measurement groups beside the CNN (fc1, fc2 zeroed)"
                                                           + ('; each client alive in its own share of the bins'
                                                              if p.get('client_rows') else '')})
        return out

    @staticmethod
    def no_attack(view, private, clients):
        """A server that only has its public images: the nearest one to each client image."""
        dbs = torch.cat([best_psnr(view.public_x, private.client(c)[0])[0] for c in clients]) if clients \
            else torch.zeros(0)
        return {'recovered_40db': float((dbs >= RECOVERED_DB).double().mean()) if len(dbs) else 0.0,
                'mean_best_psnr': float(dbs.mean()) if len(dbs) else None,
                'what': 'the nearest public (test-split) image to each client image'}

    @staticmethod
    def figure(out_dir, per_round, examples, metrics):
        """Recovered images beside their originals, and the recovery rate per client and round."""
        import os
        cols = 8
        pairs = examples[:2 * cols]
        rows = 2 * max(1, (len(pairs) + cols - 1) // cols)
        fig = plt.figure(figsize=(1.2 * cols, 1.3 * rows + 2.6))
        grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1] * rows + [2.2])
        for i, (orig, rec, label) in enumerate(pairs):
            r, c = 2 * (i // cols), i % cols
            for dr, img, what in ((0, orig, 'original'), (1, rec, label)):
                ax = fig.add_subplot(grid[r + dr, c])
                ax.imshow(img.squeeze().cpu().numpy(), cmap='gray', vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(what, fontsize=6)
        ax = fig.add_subplot(grid[rows, :])
        if per_round:
            labels = [f"r{p['round']} c{p['client']}" for p in per_round]
            xs = np.arange(len(per_round))
            ax.bar(xs, [p['recovered_40db'] for p in per_round], label=f'recovered (>= {RECOVERED_DB:g} dB)')
            ax.plot(xs, [p['ideal'] for p in per_round], 'k_', markersize=14, label='ideal (alone in a bin)')
            ax.set_xticks(xs, labels, fontsize=6, rotation=90 if len(xs) > 12 else 0)
            ax.set_ylim(0, 1)
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, metrics.get('skipped', 'nothing read out'), ha='center', va='center', fontsize=8)
            ax.axis('off')
        ax.set_title(metrics['summary'] if 'summary' in metrics else '', fontsize=7)
        fig.tight_layout()
        with atomic_path(os.path.join(out_dir, FIGURE)) as tmp:
            fig.savefig(tmp, dpi=110, format='png')
        plt.close(fig)
