"""How much of a client's batch leaks from one FedSGD gradient, by batch size (issue 14, part 1: FedSGD).

    python benchmarks/bench_leakage_map.py --data-dir ../shared/data/mnist-10k [--run-dir DIR] [--json OUT.json]

On the standard preset's trained global model (trained first without --run-dir), --images client images
(seed 0's, which no tuning looked at: the separation was tuned on seeds 11-13) go to the server in
batches of B, one gradient per batch as a client computes it, dropout unknown (train mode, mask unseen)
and off. Each gradient is attacked by the default attack (src/attacks/gradient_inversion/invert.py: every
image's fc1 input and label from the sparse factorisation of fc1's gradient, SPEAR-style, then the
feature search; the cosine search where a batch does not separate), and, as the baseline in the same run,
by the same attack with the separation it had before: units active for a single image only (the greedy
below). Per setting: fraction of images recovered (PSNR >= 30 dB and >= 25 dB to its optimally matched
original), label accuracy (per batch, as multisets), batches whose label counts are all exact, PSNR
mean / min, seconds. Not yet here: multi-step FedAvg updates and the map figure (issue 14, parts 2-3).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_gradient_inversion import attack as gi_attack  # noqa: E402
from common import standard_target  # noqa: E402
import src.attacks.gradient_inversion.invert as inv  # noqa: E402
from src.attacks.gradient_inversion.clients import pick_images  # noqa: E402
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
    own, and the share of batches whose label counts are all exact."""
    original = inv.separate_batch
    inv.separate_batch = separation or original
    try:
        m = gi_attack(view, private, index, 'default', batch_size, dropout, seed)
    finally:
        inv.separate_batch = original
    per_image = m['per_image']  # in the originals' order, each with its matched reconstruction's label
    exact = [sorted(p['true_label'] for p in per_image[s:s + batch_size]) ==
             sorted(p['recovered_label'] for p in per_image[s:s + batch_size])
             for s in range(0, len(per_image), batch_size)]
    return {'recovered_30db': m['recovered_30db'], 'recovered_25db': m['recovered_25db'],
            'label_accuracy': m['label_accuracy'], 'label_count_accuracy': sum(exact) / len(exact),
            'psnr_mean': m['psnr_mean'], 'psnr_min': m['psnr_min'], 'seconds': m['seconds']}


def line(name, m):
    return (f"{name:<40} >=30 dB {m['recovered_30db']:5.1%} | >=25 dB {m['recovered_25db']:5.1%} | "
            f"labels {m['label_accuracy']:5.1%} (counts exact {m['label_count_accuracy']:5.1%} of batches) | "
            f"PSNR {m['psnr_mean']:5.1f} mean {m['psnr_min']:5.1f} min | {m['seconds']:6.1f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=os.path.join(os.environ.get('FL_REAL_DATA', '../shared/data'), 'mnist-10k'))
    p.add_argument('--run-dir', help='folder with global_model.pth and training_history.json (default: train one)')
    p.add_argument('--batch-sizes', default='1,2,4,8,16,32,64')
    p.add_argument('--images', type=int, default=64, help='client images per setting (a multiple of every B)')
    p.add_argument('--seed', type=int, default=0, help='the reported image set')
    p.add_argument('--skip-baseline', action='store_true')
    p.add_argument('--json', help='write the numbers here too')
    args = p.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(',')]
    if any(args.images % b for b in sizes):
        sys.exit(f'error: --images {args.images} is not a multiple of every batch size {sizes}')
    try:
        view, private, run_dir = standard_target(args.data_dir, args.run_dir, tempfile.mkdtemp(prefix='bench_map_'))
    except UserError as e:
        sys.exit(f'error: {e}')
    print(f"{time.strftime('%Y-%m-%d')}: model {run_dir} (test accuracy {view.training['final_test_accuracy']:.4f}), "
          f"{args.images} images of seed {args.seed}, {torch.get_num_threads()} threads", flush=True)
    index, _ = pick_images(private.client_indices, args.images, args.seed)
    out = {'fedsgd': []}
    for dropout in (True, False):
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
    if args.json:
        save_json(out, args.json)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
