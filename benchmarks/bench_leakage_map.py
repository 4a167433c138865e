"""How much of a client's images leak from the updates FL sends: one FedSGD gradient by batch size, and
multi-step FedAvg updates (issue 14).

    python benchmarks/bench_leakage_map.py --data-dir ../shared/data/mnist-10k [--run-dir DIR] [--json OUT.json]

On the standard preset's trained global model (trained first without --run-dir), --images client images
(seed 0's, which no tuning looked at: the separation was tuned on seeds 11-14) go to the server in
batches of B, one gradient per batch as a client computes it, dropout unknown (train mode, mask unseen;
--dropout unknown,off: and off, the papers' case). Each gradient is attacked by the default attack
(src/attacks/gradient_inversion/invert.py: every image's fc1 input and label from the sparse factorisation
of fc1's gradient, SPEAR-style or from the inputs' side, images left out then by their inputs alone, then the
feature search; the cosine search where a batch does not separate), and, as the baseline in the same run,
by the same attack with the separation it had before: units active for a single image only (the greedy
below). Per setting: fraction of images recovered (PSNR >= 30 dB and >= 25 dB to its optimally matched
original), label accuracy (per batch, as multisets),
batches whose label counts are all exact, PSNR mean / min, seconds.

FedAvg (--fedavg, default the issue's client: 50 images, 10 epochs of batch 5, the record's learning rate,
dropout on; and 5 images, 5 epochs of batch 5): a client picked by the seed trains from the record's round-1
global model (--fedavg-starts first,final: and from the final one), as many clients as make 20 images
(--fedavg-images); each update is attacked by Dimitrov et al. 2022's simulation
(src/attacks/gradient_inversion/fedavg.py) and, as the baseline in the same run, by Geiping et al. 2020's
(fedavg_rounds.py, as --gi-rounds: one dummy per image, one full-batch step per epoch). --fedavg-grid
small|full adds the leakage map's FedAvg cells.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_gradient_inversion import attack as gi_attack  # noqa: E402
from common import standard_target, target_arguments  # noqa: E402
import src.attacks.gradient_inversion.invert as inv  # noqa: E402
from src.attacks.gradient_inversion.clients import pick_images  # noqa: E402
from src.attacks.gradient_inversion.fedavg import STEPS  # noqa: E402
from src.attacks.gradient_inversion.leakage_map import attack_map, grid_cells, observe_map, score_map  # noqa: E402
from src.attacks.gradient_inversion.scoring import exact_count_batches  # noqa: E402
from src.utils import UserError, save_json  # noqa: E402


def greedy_separation(weight_grad, bias_grad, batch_size, nonnegative=True, layer=None, tol=1e-3):
    """The baseline: the attack's separation before the sparse factorisation. A unit active for one image
    only gives that image's fc1 input (row / bias gradient); candidates are grouped, the most repeated
    taken first, each if outside the span of those kept, until B explain the gradient (residual < tol).
    `layer` is taken as separate_batch takes it, and not used."""
    ok = bias_grad.abs() > 1e-6 * bias_grad.abs().max()
    rows = weight_grad[ok] / bias_grad[ok, None]
    norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    close = ((rows[:, None] - rows[None]).norm(dim=2) / norms) < tol
    groups, seen = [], torch.zeros(len(rows), dtype=torch.bool)
    for i in range(len(rows)):
        if not seen[i]:
            members = close[i] & ~seen
            seen |= members
            groups.append((int(members.sum()), rows[members].mean(0)))
    groups.sort(key=lambda g: -g[0])
    chosen = []
    for _, cand in groups:
        if nonnegative and cand.min() < -tol * cand.abs().max():
            continue
        if chosen:
            A = torch.stack(chosen)
            coef = torch.linalg.lstsq(A.T, cand[:, None]).solution
            if (A.T @ coef - cand[:, None]).norm() < tol * cand.norm():
                continue
        chosen.append(cand)
        if len(chosen) == batch_size:
            break
    if len(chosen) < batch_size:
        return None
    A = torch.stack(chosen)
    Dt = torch.linalg.lstsq(A.T, weight_grad.T).solution
    if (A.T @ Dt - weight_grad.T).norm() > tol * weight_grad.norm():
        return None
    return A, Dt * batch_size, torch.ones(batch_size, dtype=torch.bool)


def attack(view, private, index, batch_size, dropout, seed, separation=None):
    """bench_gradient_inversion's attack (the default method) with `separation` in place of the attack's
    own (and then no input-side separation or inputs found alone either), and the share of batches whose label
    counts are all exact."""
    original = inv.separate_batch, inv.separate_by_inputs, inv.inputs_alone
    if separation is not None:
        inv.separate_batch, inv.separate_by_inputs, inv.inputs_alone = (separation, lambda *args, **kwargs: None,
                                                                        lambda *args, **kwargs: None)
    try:
        m = gi_attack(view, private, index, 'default', batch_size, dropout, seed)
    finally:
        inv.separate_batch, inv.separate_by_inputs, inv.inputs_alone = original
    per_image = m['per_image']  # in the originals' order, each with its matched reconstruction's label
    true, recovered = (torch.tensor([p[key] for p in per_image]) for key in ('true_label', 'recovered_label'))
    return {'recovered_30db': m['recovered_30db'], 'recovered_25db': m['recovered_25db'],
            'label_accuracy': m['label_accuracy'],
            'label_count_accuracy': exact_count_batches(true, recovered, batch_size),
            'psnr_mean': m['psnr_mean'], 'psnr_min': m['psnr_min'], 'seconds': m['seconds']}


def line(name, m):
    return (f"{name:<40} >=30 dB {m['recovered_30db']:5.1%} | >=25 dB {m['recovered_25db']:5.1%} | "
            f"labels {m['label_accuracy']:5.1%} (counts exact {m['label_count_accuracy']:5.1%} of batches) | "
            f"PSNR {m['psnr_mean']:5.1f} mean {m['psnr_min']:5.1f} min | {m['seconds']:6.1f} s")


AVERAGED = ('recovered_25db', 'recovered_30db', 'psnr_mean', 'ssim_mean', 'label_accuracy', 'baseline_recovered_25db',
            'baseline_recovered_30db', 'baseline_psnr_mean', 'mean_image_psnr_mean', 'black_image_psnr_mean')


def fedavg_line(name, m):
    return (f"{name:<9} >=25 dB {m['recovered_25db']:5.1%} | >=30 dB {m['recovered_30db']:5.1%} | PSNR "
            f"{m['psnr_mean']:5.1f} mean {m['psnr_min']:5.1f} min | labels {m['label_accuracy']:5.1%} | "
            f"{m['seconds']:6.1f} s || baseline >=25 dB {m['baseline_recovered_25db']:5.1%} PSNR "
            f"{m['baseline_psnr_mean']:5.1f} {m['baseline_seconds']:6.1f} s || no attack: mean image "
            f"{m['mean_image_psnr_mean']:5.1f}, black {m['black_image_psnr_mean']:5.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target_arguments(p)
    p.add_argument('--batch-sizes', default='1,2,4,8,16,32,64')
    p.add_argument('--images', type=int, default=64, help='client images per setting (a multiple of every B)')
    p.add_argument('--seed', type=int, default=0, help='the reported image set')
    p.add_argument('--skip-baseline', action='store_true')
    p.add_argument('--parts', default='fedsgd,fedavg', help='fedsgd, fedavg or both (default)')
    p.add_argument('--dropout', default='unknown',
                   help="FedSGD dropout cases: unknown (default: the targets'), off (the papers' case), or both")
    p.add_argument('--fedavg', default='50x10x5,5x5x5',
                   help='FedAvg clients, images x epochs x batch size, comma-separated')
    p.add_argument('--fedavg-grid', choices=['small', 'full'], help="also the leakage map's FedAvg cells")
    p.add_argument('--fedavg-starts', default='first',
                   help="first (the record's round-1 global model) and/or final, comma-separated (default first)")
    p.add_argument('--device', default='cpu', help="cpu (default) or cuda")
    p.add_argument('--fedavg-images', type=int, default=20,
                   help='at least this many images per FedAvg setting, in clients of its size (default 20)')
    p.add_argument('--fedavg-steps', type=int, default=STEPS, help=f'Adam steps per FedAvg attack (default {STEPS})')
    p.add_argument('--json', help='write the numbers here too')
    args = p.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(',')]
    if any(args.images % b for b in sizes):
        sys.exit(f'error: --images {args.images} is not a multiple of every batch size {sizes}')
    try:
        view, private, run_dir = standard_target(args.data_dir, args.run_dir, tempfile.mkdtemp(prefix='bench_map_'),
                                                 device=args.device)
    except UserError as e:
        sys.exit(f'error: {e}')
    print(f"{time.strftime('%Y-%m-%d')}: model {run_dir} (test accuracy {view.training['final_test_accuracy']:.4f}), "
          f"{args.images} images of seed {args.seed}, {torch.get_num_threads()} threads", flush=True)
    index, _ = pick_images(private.client_indices, args.images, args.seed)
    parts = args.parts.split(',')
    out = {'fedsgd': [], 'fedavg': []}
    for dropout in [d == 'unknown' for d in args.dropout.split(',')] if 'fedsgd' in parts else []:
        print(f"\n== FedSGD, one gradient per batch, dropout {'unknown' if dropout else 'off'}", flush=True)
        for b in sizes:
            m = attack(view, private, index, b, dropout, args.seed)
            print(line(f'B = {b}: default attack', m), flush=True)
            entry = {'batch_size': b, 'dropout': 'unknown' if dropout else 'off', **m}
            if not args.skip_baseline and b > 1:  # at B = 1 both are the same closed form
                base = attack(view, private, index, b, dropout, args.seed, greedy_separation)
                print(line(f'B = {b}: baseline (single-image units)', base), flush=True)
                entry.update({f'baseline_{k}': v for k, v in base.items()})
            out['fedsgd'].append(entry)
    if 'fedavg' in parts:
        settings = [tuple(int(v) for v in c.split('x')) for c in args.fedavg.split(',') if c]
        if args.fedavg_grid:
            settings += grid_cells(args.fedavg_grid)[2]
        public_mean = view.public_x.mean(0, keepdim=True)
        for start in args.fedavg_starts.split(','):
            for n, epochs, b in settings:
                clients = max(1, -(-args.fedavg_images // n))  # enough clients for --fedavg-images images
                sent, truth = observe_map(view, private, (), 0, [(n, epochs, b)] * clients, args.seed, start)
                print(f"\n== FedAvg from the {sent['start']} model: {clients} client(s) of {n} images, {epochs} "
                      f'epochs of batch {b}; Dimitrov et al. 2022, {args.fedavg_steps} steps (baseline: Geiping et '
                      'al. 2020)', flush=True)
                each = []
                for i in range(clients):  # one client at a time, printed as it finishes
                    one = dict(sent, fedavg=sent['fedavg'][i:i + 1])
                    result = attack_map(view, one, args.fedavg_steps, args.seed, progress=False)
                    each.append(score_map(result, one, dict(truth, fedavg=truth['fedavg'][i:i + 1]),
                                          public_mean)['fedavg'][0])
                    print(fedavg_line(f'client {i + 1}', each[-1]), flush=True)
                entry = {'start_model': sent['start'], **{k: each[0][k] for k in (
                    'images_per_client', 'local_epochs', 'batch_size', 'local_steps', 'learning_rate')},
                         'clients': clients, 'images': clients * n,
                         **{k: sum(e[k] for e in each) / clients for k in AVERAGED},
                         'psnr_min': min(e['psnr_min'] for e in each),
                         'seconds': sum(e['seconds'] for e in each),
                         'baseline_seconds': sum(e['baseline_seconds'] for e in each), 'per_client': each}
                if clients > 1:
                    print(fedavg_line('all', entry), flush=True)
                out['fedavg'].append(entry)
    if args.json:
        save_json(out, args.json)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
