"""Gradient inversion: the default attack against plain iDLG on the same 10 client images, same run.

Plain iDLG (Zhao et al. 2020) is what a researcher would run: label from the last-layer gradient,
then L-BFGS (300 iterations) on one image at a time, on the same 10 images (--idlg-images fewer:
its time is then scaled linearly, as it handles them one by one); the default attack
reconstructs all 10 as one batched computation. Both attack the same fp32 single-image gradients
under the trained global model. Then the batch-size curve (1, 2, 4, 8) of the default attack, dropout
off and unknown.

The reported images are seed 0's (--seed). Tuning the attack's constants (src/attacks/gradient_inversion/
search.py) must not look at them: --held-out-seeds 1-8 measures the default attack at batch size 1 on
other image sets instead, and refuses the reported seed.

    python benchmarks/bench_gradient_inversion.py --data-dir /work/shared/data/mnist-10k [--run-dir DIR]
    python benchmarks/bench_gradient_inversion.py --run-dir DIR --held-out-seeds 1-8

Without --run-dir it first trains the standard preset into a temporary folder (a few minutes).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import spread, standard_target  # noqa: E402
from src.attacks.gradient_inversion.clients import client_gradients, pick_images  # noqa: E402
from src.attacks.gradient_inversion.invert import invert  # noqa: E402
from src.attacks.gradient_inversion.scoring import score_case  # noqa: E402
from src.attacks.gradient_inversion.search import BATCH_STEPS  # noqa: E402
from src.metrics import psnr  # noqa: E402
from src.utils import UserError  # noqa: E402


def attack(view, private, index, method, batch_size, dropout, seed, iterations=None):
    """One method on the gradients of the clients' images `index`: the metrics of scoring.score_case."""
    idx = torch.as_tensor(index, device=private.train_x.device)
    x, y = private.train_x[idx], private.train_y[idx]
    grads = client_gradients(view.model, x, y, batch_size, dropout, seed=seed + 1)  # the clients' side
    t0 = time.perf_counter()
    result = invert(view.model, grads, method, batch_size, iterations, seed=seed, progress=False,
                    public=view.public_x)  # the server's side: gradients and public data only
    seconds = time.perf_counter() - t0
    _, _, m = score_case(x, result, y, batch_size)
    m['seconds'] = seconds
    return m


def line(name, m):
    return (f"{name:<34} PSNR {m['psnr_mean']:6.2f} mean {m['psnr_min']:6.2f} min | "
            f">=30 dB {m['recovered_30db']:4.0%} | SSIM {m['ssim_mean']:.3f} | "
            f"labels {100 * m['label_accuracy']:5.1f}% | failed {m['n_failed']} | {m['seconds']:7.2f} s")


def parse_seeds(text):
    """'1-8' or '1,3,5' -> [ints]."""
    seeds = []
    for part in text.split(','):
        lo, _, hi = part.partition('-')
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def held_out(view, private, seeds, images, reported_seed):
    """The default attack at batch size 1 on image sets no reported number uses."""
    if reported_seed in seeds:
        sys.exit(f'error: --held-out-seeds must leave out the reported images (--seed {reported_seed})')
    print(f'== held-out image sets (seeds {seeds}), {images} images each, default attack, batch size 1')
    rows = {False: [], True: []}
    for seed in seeds:
        index, _ = pick_images(private.client_indices, images, seed)
        for dropout in (False, True):
            m = attack(view, private, index, 'default', 1, dropout, seed)
            rows[dropout].append(m)
            print(line(f"seed {seed}, dropout {'unknown' if dropout else 'off'}", m), flush=True)
    for dropout, ms in rows.items():
        p = np.array([i['psnr'] for m in ms for i in m['per_image']])
        print(f"all held-out, dropout {'unknown' if dropout else 'off'}: PSNR {p.mean():.2f} mean / {p.min():.2f} "
              f"worst, >= 30 dB {np.mean(p >= 30):.0%}, >= 25 dB {np.mean(p >= 25):.0%} ({len(p)} images)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default='/work/shared/data/mnist-10k')
    p.add_argument('--run-dir', help='folder with global_model.pth + training_history.json (default: train one)')
    p.add_argument('--images', type=int, default=10)
    p.add_argument('--idlg-iterations', type=int, default=300)
    p.add_argument('--idlg-images', type=int, default=None,
                   help='images plain iDLG attacks (default: all --images); with fewer, its per-image time is '
                        'scaled to --images')
    p.add_argument('--curve-iterations', type=int, default=None,
                   help=f'Adam steps for batch sizes > 1 (default: the attack\'s, {BATCH_STEPS})')
    p.add_argument('--batch-sizes', default='1,2,4,8')
    p.add_argument('--repeats', type=int, default=3,
                   help='timed runs of plain iDLG and the default, alternating (median and range reported)')
    p.add_argument('--seed', type=int, default=0, help='the reported image set (default 0)')
    p.add_argument('--held-out-seeds', type=parse_seeds, default=None,
                   help="instead of the report: the default attack on these seeds' image sets (e.g. 1-8), "
                        'for tuning without looking at the reported images')
    args = p.parse_args()
    try:
        view, private, run_dir = standard_target(args.data_dir, args.run_dir, tempfile.mkdtemp(prefix='bench_gi_'))
    except UserError as e:
        sys.exit(f'error: {e}')
    print(f"model: {run_dir} (test accuracy {view.training['final_test_accuracy']:.4f}), "
          f'{torch.get_num_threads()} threads')
    if args.held_out_seeds:
        held_out(view, private, args.held_out_seeds, args.images, args.seed)
        return
    index, _ = pick_images(private.client_indices, args.images, args.seed)
    x = private.train_x[torch.as_tensor(index)]
    public_mean = view.public_x.mean(0, keepdim=True).expand_as(x)
    print(f"reported images: seed {args.seed}; trivial guesses: gray 0.5 "
          f"{psnr(torch.full_like(x, 0.5), x).mean():.2f} dB, public mean image {psnr(public_mean, x).mean():.2f} dB")

    print(f'\n== batch size 1, {args.images} images, dropout off (the papers\' case)')
    k = min(args.idlg_images or args.images, args.images)
    idlg_s, ours_s = [], []
    for _ in range(args.repeats):  # alternating, so drift of the shared host hits both alike
        idlg = attack(view, private, index[:k], 'idlg', 1, False, args.seed, args.idlg_iterations)
        ours = attack(view, private, index, 'default', 1, False, args.seed)
        idlg_s.append(idlg['seconds'] / k * args.images)  # one image at a time: time is linear in the images
        ours_s.append(ours['seconds'])
    print(line(f'plain iDLG ({args.idlg_iterations} L-BFGS), first {k}', idlg))
    print(line(f'default (batched), all {args.images}', ours))
    scaled = f'measured on {k}, scaled linearly' if k < args.images else 'measured'
    print(f"plain iDLG for {args.images} images: {spread(idlg_s)} ({scaled}); default {spread(ours_s)}; "
          f"speed-up {spread([a / b for a, b in zip(idlg_s, ours_s)], 'x', 1)}; "
          f"PSNR {ours['psnr_mean'] - idlg['psnr_mean']:+.2f} dB "
          f"(default's mean over the same {k}: "
          f"{sum(p['psnr'] for p in ours['per_image'][:k]) / k:.2f} dB)")
    print('\n== batch size 1, dropout unknown (client in train mode, mask unknown to the server)')
    print(line('default (batched)', attack(view, private, index, 'default', 1, True, args.seed)))

    print('\n== batch-size curve, default attack (batches the fc1 gradient does not separate: cosine fallback)')
    for dropout in (False, True):
        for bs in [int(b) for b in args.batch_sizes.split(',')]:
            n_batches = max(1, args.images // bs)
            idx, _ = pick_images(private.client_indices, n_batches * bs, args.seed)
            iters = None if bs == 1 else args.curve_iterations
            name = f"bs {bs} ({n_batches} batches), dropout {'unknown' if dropout else 'off'}"
            print(line(name, attack(view, private, idx, 'default', bs, dropout, args.seed, iters)))


if __name__ == '__main__':
    main()
