"""The leakage map: how much of a client's images its updates give away, as federated learning sends them.

    (a) FedSGD: one gradient of a batch of B images (dropout unknown to the server), attacked by the
        default attack (invert.py: labels and fc1 inputs from the gradient, then the feature search).
    (b) FedAvg: a client holding n images runs S local SGD steps from the record's first global model
        (round 1: the model clients train hardest on) and sends its update; the server knows the protocol
        (n, epochs, batch size, learning rate) but not the shuffle or the dropout masks. Attacked by
        Dimitrov et al. 2022 (fedavg.py), and as the baseline in the same run by Geiping et al. 2020's
        simulation (fedavg_rounds.py: n dummies, one full-batch step per epoch, as --gi-rounds).
The presets' own corner (a client's whole share, its recorded local steps) is the real record: what
--gi-rounds recovered from the captured updates, not a simulation.

S steps are run as whole epochs of the largest batch (at most the presets' 64 where S allows) that gives
exactly S steps: 1,600 images at 125 steps are 5 epochs of 64 (the standard preset), at 10 steps one epoch
of 160; 5 images at 25 steps are 25 epochs of 5.
Clients' side (observe_map) -> server's side (attack_map, the view only) -> scoring (score_map).
"""
import copy
import itertools
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from src.attacks.gradient_inversion.clients import client_gradients, pick_images
from src.attacks.gradient_inversion.fedavg import invert_fedavg
from src.attacks.gradient_inversion.fedavg_rounds import invert_updates
from src.attacks.gradient_inversion.invert import Inversion, invert
from src.attacks.gradient_inversion.labels import recover_labels
from src.attacks.gradient_inversion.layers import frozen, output_bias, param_names
from src.attacks.gradient_inversion.scoring import baselines, exact_count_batches, score_case
from src.client import client_update
from src.metrics import psnr
from src.model import seed_dropout
from src.utils import UserError

MAX_BATCH = 64  # the presets' batch size
THREAT_MODEL = ('FedSGD cells: one undefended gradient per batch under the final model, dropout unknown; FedAvg '
                "cells: one undefended update of a client after its local steps (dropout on; shuffle and masks "
                'unknown to the server, the protocol known); the private images reach the scoring only')
# small: the default run's map (under a minute on 2 cores); full: the whole grid
GRIDS = {
    'small': {'fedsgd': (1, 8), 'fedsgd_images': 8, 'fedavg': ((5, 1), (5, 2), (5, 5))},
    'full': {'fedsgd': (1, 2, 4, 8, 16, 32, 64), 'fedsgd_images': 64,
             'fedavg': tuple(itertools.product((5, 50, 200, 1600), (1, 2, 5, 10, 25, 125)))},
}


def schedule(n, steps, max_batch=MAX_BATCH):
    """(epochs, batch size) of a client with n images taking exactly `steps` local SGD steps: whole epochs,
    the largest batch of at most max_batch that fits, else the smallest batch that does."""
    options = []
    for epochs in range(1, steps + 1):
        if steps % epochs:
            continue
        per_epoch = steps // epochs
        b = math.ceil(n / per_epoch)
        if math.ceil(n / b) == per_epoch:
            options.append((b, epochs))
    if not options:
        raise UserError(f'{n} images cannot be split into batches giving exactly {steps} local steps')
    fitting = [o for o in options if o[0] <= max_batch]
    b, epochs = max(fitting) if fitting else min(options)
    return epochs, b


def start_weights(view, which='first'):
    """The weights FedAvg cells start from, and their name: the record's first global model ('first', where
    there is a record), or the final one."""
    names = param_names(view.model)
    rounds = [r for r in (view.captured or {}).get('rounds', []) if 'crafted' not in r]
    if which == 'first' and rounds:
        return {k: rounds[0]['global_state'][k].float().to(view.device) for k in names}, f"round {rounds[0]['round']}"
    return {k: v.detach().clone() for k, v in view.model.named_parameters()}, 'final'


def grid_cells(grid):
    """(FedSGD batch sizes, images they are tried on, FedAvg cells [(n, local epochs, batch size)])."""
    spec = GRIDS[grid]
    return spec['fedsgd'], spec['fedsgd_images'], [(n, *schedule(n, steps)) for n, steps in spec['fedavg']]


def observe_map(view, private, batch_sizes, fedsgd_images, fedavg_cells, seed, start='first'):
    """The clients: for each FedSGD batch size, one gradient per batch of the same seeded images (final
    model); for each FedAvg cell (n, epochs, batch size), a client's n images (seeded) trained with dropout
    from start_weights. Nothing is defended. Returns (sent, truth)."""
    model = view.model
    sent = {'fedsgd': [], 'fedavg': []}
    truth = {'fedsgd': None, 'fedavg': []}
    if batch_sizes:
        index, _ = pick_images(private.client_indices, fedsgd_images, seed)
        idx = torch.as_tensor(index, device=private.train_x.device)
        images, labels = private.train_x[idx], private.train_y[idx]
        truth['fedsgd'] = (images, labels)
        for b in batch_sizes:
            grads = client_gradients(model, images, labels, b, True, 'fp32', seed + 1)
            sent['fedsgd'].append({'batch_size': b, 'gradients': grads})
    weights, sent['start'] = start_weights(view, start)
    sent['start_weights'] = weights  # the server sent them: it knows them
    lr = view.captured['meta']['learning_rate'] if view.captured else view.config['learning_rate']
    rng = np.random.default_rng(seed)
    for n, epochs, b in fedavg_cells:
        holders = [c for c, ix in enumerate(private.client_indices) if len(ix) >= n]
        if not holders:
            continue  # no client holds n images: the cell stays empty
        c = int(rng.choice(holders))
        mine = torch.as_tensor(rng.choice(private.client_indices[c], n, replace=False), device=private.train_x.device)
        x, y = private.train_x[mine], private.train_y[mine]
        client_model = copy.deepcopy(model)
        client_model.load_state_dict({**client_model.state_dict(), **weights})
        seed_dropout(client_model, torch.Generator(device=x.device).manual_seed(seed + 1000 * n + epochs))
        trained, _ = client_update(client_model, x, y, epochs, b, lr,
                                   generator=torch.Generator().manual_seed(seed + n + epochs))
        steps = epochs * math.ceil(n / b)
        sent['fedavg'].append({'images_per_client': n, 'local_steps': steps, 'local_epochs': epochs,
                               'batch_size': b, 'learning_rate': lr,
                               'delta': {k: (trained[k] - weights[k]).detach() for k in weights}})
        truth['fedavg'].append((x, y))
    return sent, truth


def attack_map(view, sent, steps, seed, iterations=None, restarts=2, progress=True):
    """The server: every map cell attacked from what it received; steps: Adam steps of the FedAvg attacks,
    iterations/restarts: the default attack's (FedSGD cells, and FedAvg cells of one step). Returns one
    result per cell."""
    model = view.model
    generator = torch.Generator().manual_seed(seed)
    start = sent['start_weights']
    out = {'fedsgd': [], 'fedavg': []}
    cells = len(sent['fedsgd']) + len(sent['fedavg'])
    bar = tqdm(total=cells, desc='leakage map', unit='cell', disable=not progress)
    for cell in sent['fedsgd']:
        t0 = time.perf_counter()
        inv = invert(model, cell['gradients'], 'default', cell['batch_size'], iterations, restarts, seed,
                     progress=False, public=view.public_x)
        out['fedsgd'].append({'inversion': inv, 'seconds': time.perf_counter() - t0})
        bar.update()
    for cell in sent['fedavg']:
        n, epochs, b, lr = cell['images_per_client'], cell['local_epochs'], cell['batch_size'], cell['learning_rate']
        t0 = time.perf_counter()
        images, labels, failed = invert_fedavg(model, start, cell['delta'], n, epochs, b, lr, steps, generator,
                                               view.public_x, view.public_y, iterations, restarts)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        deltas = {k: v[None] for k, v in cell['delta'].items()}
        base_labels = recover_labels(-deltas[output_bias(model)], n)
        with frozen(model):
            base, base_failed = invert_updates(model, start, deltas, base_labels, epochs, lr, steps, generator)
        out['fedavg'].append({'images': images, 'labels': labels, 'failed': failed, 'seconds': seconds,
                              'baseline': base, 'baseline_failed': bool(base_failed[0]),
                              'baseline_seconds': time.perf_counter() - t0})
        bar.update()
    bar.close()
    return out


SCORES = ('recovered_25db', 'recovered_30db', 'psnr_mean', 'psnr_min', 'ssim_mean', 'label_accuracy')


def _scores(originals, inversion, true_labels, batch_size):
    """The gradient attack's own scoring (score_case), the numbers a map cell keeps."""
    m = score_case(originals, inversion, true_labels, batch_size)[2]
    return {k: m[k] for k in SCORES}


def score_map(result, sent, truth, public_mean, rounds=None, meta=None):
    """Every cell scored against its client's images, next to the no-attack guesses (public mean image,
    black image). rounds, meta: --gi-rounds' scored record and the record's training meta, for the presets'
    corner. Returns the map's metrics."""
    fedsgd = []
    for cell, r in zip(sent['fedsgd'], result['fedsgd']):
        b, inv = cell['batch_size'], r['inversion']
        images, labels = truth['fedsgd']
        fedsgd.append({'batch_size': b, 'dropout': 'unknown', **_scores(images, inv, labels, b),
                       'label_count_accuracy': exact_count_batches(labels, inv.labels, b),
                       'failed': int(inv.failed.sum()), 'seconds': r['seconds']})
    fedavg = []
    for cell, r, (x, y) in zip(sent['fedavg'], result['fedavg'], truth['fedavg']):
        n = cell['images_per_client']
        no = torch.zeros(n, dtype=torch.bool)
        m = _scores(x, Inversion(r['images'], r['labels'], r['failed'], no), y, n)
        base = _scores(x, Inversion(r['baseline'], r['labels'], torch.full((n,), r['baseline_failed']), no), y, n)
        fedavg.append({key: cell[key] for key in ('images_per_client', 'local_steps', 'local_epochs', 'batch_size',
                                                  'learning_rate')}
                      | m | {'failed': int(r['failed'].sum()), 'seconds': r['seconds'],
                             **{f'baseline_{k}': base[k] for k in ('recovered_25db', 'recovered_30db', 'psnr_mean')},
                             'baseline_failed': r['baseline_failed'], 'baseline_seconds': r['baseline_seconds'],
                             'mean_image_psnr_mean': baselines(x, public_mean)['dataset_mean_psnr_mean'],
                             'black_image_psnr_mean': psnr(torch.zeros_like(x), x).mean().item()})
    out = {'fedsgd': fedsgd, 'fedavg': fedavg, 'fedavg_start': sent['start'], 'recovered_threshold_db': [25.0, 30.0],
           'threat_model': THREAT_MODEL}
    if rounds and meta:
        out['preset'] = preset_corner(rounds, meta)
    out['summary'] = summary(out)
    return out


def preset_corner(rounds, meta):
    """The presets' own cell from the attacked record (first captured round, mean over its clients): the
    share of a client's images that some dummy recovered (at most dummies / images), placed at the clients'
    mean share of images and the local steps that took."""
    first = rounds[0]
    cells = first['clients']
    images_per_client = round(np.mean([c['client_images'] for c in cells]))
    steps = meta['local_epochs'] * math.ceil(images_per_client / meta['batch_size'])
    return {'images_per_client': images_per_client, 'local_steps': steps, 'round': first['round'],
            'recovered_25db': float(np.mean([c['recovered_25db'] for c in cells])),
            'recovered_30db': float(np.mean([c['recovered_30db'] for c in cells])),
            'psnr_max': first['psnr_max'], 'source': 'the recorded updates (--gi-rounds), not a simulation'}


def summary(m):
    """One sentence on what the map says."""
    fedsgd = m['fedsgd']
    leaky = [c['batch_size'] for c in fedsgd if c['recovered_25db'] >= 0.5]
    fa = [c for c in m['fedavg'] if c['recovered_25db'] >= 0.5]
    parts = []
    if fedsgd:
        parts.append(f"one FedSGD gradient gives away at least half of its batch (>= 25 dB) up to B = {max(leaky)}"
                     if leaky else 'no FedSGD batch size tried gives away half of its batch (>= 25 dB)')
    if fa:
        worst = max(fa, key=lambda c: (c['local_steps'] * c['images_per_client']))
        steps = worst['local_steps']
        parts.append(f"a FedAvg update still does at {worst['images_per_client']} images x {steps} local "
                     f"step{'s' if steps > 1 else ''}")
    else:
        parts.append('no FedAvg update tried does')
    if 'preset' in m:
        p = m['preset']
        parts.append(f"at the presets' own setting ({p['images_per_client']} images, {p['local_steps']} steps) the "
                     f"recorded updates give away {100 * p['recovered_25db']:.1f} % of a client's images")
    return '; '.join(parts) + '.'


def plot_map(path, m):
    """FedSGD: recovered fraction by batch size; FedAvg: heat map of the recovered fraction (>= 25 dB) over
    local steps x images per client, the baseline's beside each number, the presets' corner boxed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from src.utils import atomic_path
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={'width_ratios': [1, 1.4]})
    bs = [c['batch_size'] for c in m['fedsgd']]
    for key, style, label in (('recovered_30db', 'o-', '>= 30 dB'), ('recovered_25db', 's--', '>= 25 dB'),
                              ('label_accuracy', 'k:', 'labels')):
        a1.plot(bs, [c[key] for c in m['fedsgd']], style, label=label)
    a1.set_xscale('log', base=2)
    a1.set_xticks(bs, [str(b) for b in bs])
    a1.set_ylim(-0.03, 1.03)
    a1.set_xlabel('images per gradient (B)')
    a1.set_ylabel('fraction of images recovered')
    a1.set_title('FedSGD: one gradient of a batch\n(final model, dropout unknown)', fontsize=9)
    a1.legend(fontsize=7)
    cells = {(c['images_per_client'], c['local_steps']):
             (c['recovered_25db'], f"{100 * c['recovered_25db']:.0f}%\n({100 * c['baseline_recovered_25db']:.0f}%)")
             for c in m['fedavg']}
    preset = m.get('preset')
    if preset:  # the record: beside the simulated cell at the same place, if the grid has one
        key = (preset['images_per_client'], preset['local_steps'])
        value, text = cells.get(key, (preset['recovered_25db'], ''))
        cells[key] = (value, f"{text}\nrecord {100 * preset['recovered_25db']:.0f}%".strip())
    rows = sorted({k[0] for k in cells})
    cols = sorted({k[1] for k in cells})
    grid = np.full((len(rows), len(cols)), np.nan)
    for (n, s), (v, _) in cells.items():
        grid[rows.index(n), cols.index(s)] = v
    im = a2.imshow(grid, vmin=0, vmax=1, cmap='magma', aspect='auto')
    for (n, s), (v, text) in cells.items():
        a2.text(cols.index(s), rows.index(n), text, ha='center', va='center', fontsize=7,
                color='white' if v < 0.6 else 'black')
    if preset:
        i, j = rows.index(preset['images_per_client']), cols.index(preset['local_steps'])
        a2.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec='cyan', lw=2))
    a2.set_xticks(range(len(cols)), [str(c) for c in cols])
    a2.set_yticks(range(len(rows)), [str(r) for r in rows])
    a2.set_xlabel('local SGD steps')
    a2.set_ylabel('images per client')
    a2.set_title(f"FedAvg: one client's update from the {m['fedavg_start']} model, recovered >= 25 dB\n"
                 "(Geiping's baseline below; boxed: the presets' own clients, attacked in the record)", fontsize=9)
    fig.colorbar(im, ax=a2, fraction=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)
