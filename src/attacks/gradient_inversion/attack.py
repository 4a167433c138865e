"""Gradient inversion as an Attack: recover clients' training images and labels from the gradients they send.

Threat model: an honest-but-curious server that knows the model weights it sent out and the batch
size, and sees one gradient a client computed on one training batch (after the client's defenses;
with secure aggregation only the mean over the round's clients). Labels are recovered from the
gradient, never given. observe() simulates the clients (clients.py); run() sees the AttackerView
only: the gradients observed, the server's record of FedAvg updates, its public data and the model;
score() measures against the clients' images.

Methods (--gi-method): dlg (Zhu et al. 2019) and idlg (Zhao et al. 2020), L-BFGS one image at a time
(dlg.py); default: labels (labels.py) and fc1's input (closed_form.py) read off the gradient exactly,
then a search for images whose conv weight gradients match (search.py; R-GAP's linearity, Zhu &
Blaschko 2021, under a TV prior, Geiping et al. 2020). --gi-rounds: the multi-step attack on the
recorded FedAvg updates (fedavg_rounds.py).
"""
import argparse
import math
import os
import time

import numpy as np
import torch

from src.attacks.base import Attack, Observation, Report
from src.attacks.gradient_inversion.clients import clients_per_gradient, pick_images, sent_gradients
from src.attacks.gradient_inversion.dlg import ITERATIONS
from src.attacks.gradient_inversion.fedavg import STEPS as FEDAVG_STEPS
from src.attacks.gradient_inversion.fedavg_rounds import invert_rounds
from src.attacks.gradient_inversion.figures import plot_reconstructions, plot_rounds
from src.attacks.gradient_inversion.invert import METHODS, invert
from src.attacks.gradient_inversion.leakage_map import GRIDS, attack_map, grid_cells, observe_map, plot_map, \
    score_map
from src.attacks.gradient_inversion.scoring import baselines, score_case, score_rounds
from src.attacks.gradient_inversion.search import BATCH_STEPS, STEPS
from src.defenses import active
from src.plots import as_pixels
from src.utils import UserError

DEFENSE_SETTINGS = ('dp_noise_multiplier', 'dp_max_grad_norm', 'update_clip', 'update_noise', 'keep_fraction',
                    'secure_aggregation')


def dropout_cases(settings):
    return ['off', 'unknown'] if settings.gi_dropout == 'both' else [settings.gi_dropout]


def client_precision(view, settings):
    """The arithmetic of the client's gradient: fp32, or what training announced it used."""
    return view.training.get('precision', 'fp32') if settings.gi_precision == 'train' else 'fp32'


class GradientInversion(Attack):
    name = 'gradient'
    key = 'gradient_inversion'
    title = 'Gradient inversion'
    figures = ('gradient_inversion_idlg.png', 'gradient_inversion_rounds.png', 'leakage_map.png')
    captions = {'leakage_map.png': 'leakage_map.summary'}
    headline = (('main.recovered_30db', 'images recovered (>= 30 dB)', 'fraction'),
                ('main.recovered_25db', 'images recovered (>= 25 dB)', 'fraction'),
                ('main.psnr_mean', 'mean PSNR (dB)', 'db'),
                ('main.label_accuracy', 'labels recovered', 'fraction'),
                ('baselines.dataset_mean_psnr_mean', 'no attack: public mean image (dB)', 'db'))

    def add_arguments(self, parser):
        g = parser.add_argument_group('gradient inversion')
        g.add_argument('--gi-method', choices=list(METHODS), default='default',
                       help='dlg (Zhu 2019), idlg (Zhao 2020) or default (closed-form fc1 input + conv gradients)')
        g.add_argument('--gi-images', type=int, default=10, help='client images attacked (default 10)')
        g.add_argument('--gi-batch-size', type=int, default=1,
                       help='images per intercepted gradient (1, 2, 4, 8, ...; default 1)')
        g.add_argument('--gi-dropout', choices=['off', 'unknown', 'both'], default='both',
                       help="client's dropout: off (papers' case), unknown (train-mode mask the server does not "
                            'know), or both (default)')
        g.add_argument('--gi-iterations', type=int, default=None,
                       help=f'optimiser iterations (default: {ITERATIONS} L-BFGS for dlg/idlg; default method: '
                            f'{STEPS} Adam steps, {BATCH_STEPS} for batches)')
        g.add_argument('--gi-restarts', type=int, default=2,
                       help='default method: starts per image, batched (black, public mean image, then noise); '
                            'the one whose features match the recovered fc1 input best is kept (default 2)')
        g.add_argument('--gi-rounds', action=argparse.BooleanOptionalAction, default=True,
                       help='also attack the recorded FedAvg update of every client in every captured round '
                            '(--no-gi-rounds skips it)')
        g.add_argument('--gi-rounds-dummies', type=int, default=4, help='dummy images per attacked update (default 4)')
        # On the standard preset (mnist-10k) the dummies' PSNR to the nearest client image, mean over rounds,
        # was 13.9 / 12.7 / 11.6 / 11.5 dB after 10 / 20 / 40 / 80 steps: more steps fit the update's
        # direction better without finding a client's image, so 10 is the default, at a quarter of 40's time.
        g.add_argument('--gi-rounds-steps', type=int, default=10, help='Adam steps per captured round (default 10)')
        g.add_argument('--gi-rounds-local-steps', type=int, default=None,
                       help='local SGD steps simulated on the dummies (default: the recorded local epochs)')
        g.add_argument('--gi-map', choices=['none', *GRIDS], default='small',
                       help='the leakage map (leakage_map.png): FedSGD by batch size, FedAvg by local steps x images '
                            'per client; small (default, about half a minute on 2 cores), full (the whole grid: '
                            'hours), none')
        g.add_argument('--gi-map-steps', type=int, default=FEDAVG_STEPS,
                       help=f'Adam steps of each FedAvg attack on the map (default {FEDAVG_STEPS})')
        g.add_argument('--gi-precision', choices=['fp32', 'train'], default='fp32',
                       help="arithmetic of the client's gradient: fp32, or the precision training used (bf16 here)")

    def check(self, settings):
        s = settings
        if s.gi_batch_size < 1 or s.gi_images < 1:
            raise UserError('--gi-batch-size and --gi-images must be at least 1')
        if s.gi_restarts < 1 or (s.gi_iterations is not None and s.gi_iterations < 1):
            raise UserError('--gi-restarts and --gi-iterations must be at least 1')
        if s.gi_rounds_dummies < 1 or s.gi_rounds_steps < 1 or (s.gi_rounds_local_steps is not None
                                                                and s.gi_rounds_local_steps < 1):
            raise UserError('--gi-rounds-dummies, --gi-rounds-steps and --gi-rounds-local-steps must be at least 1')
        if s.gi_map_steps < 1:
            raise UserError('--gi-map-steps must be at least 1')
        if s.gi_method != 'default' and s.gi_batch_size != 1:
            raise UserError(f'--gi-method {s.gi_method} attacks single-image gradients: use --gi-batch-size 1')

    def observe(self, private, view, settings):
        """The clients: pick the attacked images by seed and compute what each sends, per dropout case."""
        s, cfg = settings, view.config
        bs, k = s.gi_batch_size, clients_per_gradient(cfg)
        received = k * bs  # images behind each gradient the server receives
        if received > 1 and s.gi_method != 'default':
            raise UserError(f'--gi-method {s.gi_method} attacks single-image gradients; the server sees batches of '
                            f'{received} (secure aggregation over {k} clients x batch {bs}): use --gi-method default')
        n_received = max(1, math.ceil(s.gi_images * bs / received))
        index, owners = pick_images(private.client_indices, n_received * received, s.seed)
        idx = torch.as_tensor(index, device=private.train_x.device)
        images, labels = private.train_x[idx], private.train_y[idx]
        precision = client_precision(view, s)
        gradients = {case: sent_gradients(view.model, images, labels, bs, case == 'unknown', cfg, precision, s.seed)
                     for case in dropout_cases(s)}
        sent = {'gradients': gradients, 'batch_size': received, 'client_batch_size': bs,
                'clients_per_gradient': k, 'precision': precision, 'map': None}
        truth = {'images': images, 'labels': labels, 'indices': index, 'owners': owners}
        if s.gi_map != 'none':
            sent['map'], truth['map'] = observe_map(view, private, *grid_cells(s.gi_map), s.seed)
        return Observation(sent=sent, truth=truth)

    def run(self, view, settings):
        """The server: every observed gradient inverted, then (--gi-rounds) its recorded FedAvg updates."""
        s, observed = settings, view.observed
        if observed is None:
            raise ValueError('gradient inversion attacks what clients sent: the view needs observe()\'s gradients')
        if s.gi_rounds and view.captured is None:
            raise UserError('no recorded updates (captured_updates.pt beside the model): run main.py, '
                            'or pass --no-gi-rounds')
        cases = {}
        for case, grads in observed['gradients'].items():
            t0 = time.perf_counter()
            inversion = invert(view.model, grads, s.gi_method, observed['batch_size'], s.gi_iterations,
                               s.gi_restarts, s.seed, public=view.public_x)
            cases[case] = {'inversion': inversion, 'seconds': time.perf_counter() - t0}
        rounds = None
        if s.gi_rounds:
            t0 = time.perf_counter()
            rounds = invert_rounds(view.model, view.captured, s.gi_rounds_dummies, s.gi_rounds_steps, s.seed,
                                   s.gi_rounds_local_steps, view.device)
            rounds['seconds'] = time.perf_counter() - t0
        leakage_map = None
        if observed['map'] is not None:
            t0 = time.perf_counter()
            leakage_map = attack_map(view, observed['map'], s.gi_map_steps, s.seed, s.gi_iterations, s.gi_restarts)
            leakage_map['seconds'] = time.perf_counter() - t0
        return {'cases': cases, 'rounds': rounds, 'map': leakage_map}

    def score(self, result, private, truth, view, settings, out_dir):
        s, observed, cfg = settings, view.observed, view.config
        received, bs, k = observed['batch_size'], observed['client_batch_size'], observed['clients_per_gradient']
        originals, true_labels = truth['images'], truth['labels']
        public_mean = view.public_x.mean(0, keepdim=True)
        cases, shown = {}, []
        arrays = {'originals': as_pixels(originals), 'true_labels': true_labels.cpu().numpy(),
                  'indices': truth['indices']}
        for case, r in result['cases'].items():
            recon, labels, m = score_case(originals, r['inversion'], true_labels, received, truth['owners'])
            m['seconds'] = r['seconds']
            cases[f'dropout_{case}'] = m
            arrays[f'reconstructions_dropout_{case}'] = as_pixels(recon)
            arrays[f'recovered_labels_dropout_{case}'] = labels.cpu().numpy()
            shown.append((f'dropout {case}', recon, m['per_image']))
        baseline = baselines(originals, public_mean)
        defenses = active(cfg)
        plot_reconstructions(os.path.join(out_dir, 'gradient_inversion_idlg.png'), originals, true_labels, shown,
                             f'gradient inversion ({s.gi_method}, batch size {received}'
                             f"{', defenses: ' + '+'.join(defenses) if defenses else ''}): recovered label, PSNR")
        main_case = 'dropout_unknown' if 'dropout_unknown' in cases else next(iter(cases))
        main = cases[main_case]
        metrics = {
            'method': s.gi_method,
            'batch_size': received,
            'images': len(originals),
            'seed': s.seed,
            'threat_model': {
                'observed': (f'the mean gradient of {k} clients (secure aggregation), each on one training batch of '
                             f'{bs} image(s), under the global model: one batch of {received} images to the attacker'
                             if k > 1 else
                             f'one gradient of one training batch of {bs} image(s) per client, under the global model'),
                'model_weights': 'known', 'batch_size': 'known', 'labels': 'recovered from the gradient, not given',
                'dropout': {'off': "no dropout active (model in eval mode, the papers' case)",
                            'unknown': 'train mode with a random dropout mask the server does not know'},
                'client_precision': observed['precision'],
                'prior': 'default method: total variation, the mean image of the public test split as one start, and '
                         'a ridge regression fitted on the public images for the pixels the model never sees',
                'scoring_only': "the clients' images behind the gradients; the no-attack baselines use public data",
                'defenses': defenses or 'none',
                'defense_settings': {key: cfg.get(key) for key in DEFENSE_SETTINGS if key in cfg},
            },
            **cases,
            'main': {'case': main_case, **{key: v for key, v in main.items() if key != 'per_image'}},
            'baselines': baseline,
            'summary': (f"{main_case}: {100 * main['recovered_30db']:.0f}% of images recovered (>= 30 dB), PSNR "
                        f"{main['psnr_mean']:.1f} dB mean / {main['psnr_min']:.1f} min, labels "
                        f"{100 * main['label_accuracy']:.0f}% (public mean-image guess "
                        f"{baseline['dataset_mean_psnr_mean']:.1f} dB, gray {baseline['gray_0.5_psnr_mean']:.1f} dB)"),
        }
        if result['rounds'] is not None:
            attacked, meta = result['rounds'], view.captured['meta']
            rounds, best = score_rounds(attacked, private, public_mean)
            metrics['fedavg_rounds'] = {
                'method': (f'simulated local training (Geiping et al. 2020): {s.gi_rounds_dummies} dummy images per '
                           f"update, {attacked['local_steps']} local SGD steps, cosine match of the update"),
                'dummies_per_update': s.gi_rounds_dummies, 'steps_per_round': s.gi_rounds_steps,
                'simulated_local_steps': attacked['local_steps'],
                'local_training': {key: meta.get(key) for key in ('local_epochs', 'batch_size', 'learning_rate')},
                'rounds': rounds, 'seconds': attacked['seconds']}
            plot_rounds(os.path.join(out_dir, 'gradient_inversion_rounds.png'), rounds, best)
            arrays['fedavg_rounds_best_dummy'] = np.stack([b[1] for b in best])
        if result['map'] is not None:
            m = score_map(result['map'], observed['map'], truth['map'], public_mean,
                          metrics.get('fedavg_rounds', {}).get('rounds'), view.captured and view.captured['meta'])
            m['grid'], m['seconds'] = s.gi_map, result['map']['seconds']
            metrics['leakage_map'] = m
            plot_map(os.path.join(out_dir, 'leakage_map.png'), m)
        return Report(metrics, arrays)
