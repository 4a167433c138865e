"""Gradient inversion: the default attack against plain iDLG on the same 10 client images, same run.

Plain iDLG (Zhao et al. 2020) is what a researcher would run: label from the last-layer gradient,
then L-BFGS (300 iterations) on one image at a time, on the same 10 images (--idlg-images fewer:
its time is then scaled linearly, as it handles them one by one); the default attack
reconstructs all 10 as one batched computation. Both attack the same fp32 single-image gradients
under the trained global model. Then the batch-size curve (1, 2, 4, 8) of the default attack, dropout off and unknown.

    python benchmarks/bench_gradient_inversion.py --data-dir /work/shared/data/mnist-10k [--run-dir DIR]

Without --run-dir it first trains the standard preset into a temporary folder (about a minute).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.attacks import gradient_inversion as gi  # noqa: E402
from common import standard_target  # noqa: E402
from src.metrics import psnr  # noqa: E402
from src.utils import UserError  # noqa: E402


def attack(target, index, method, batch_size, dropout, seed, iterations=None):
    idx = torch.as_tensor(index, device=target.device)
    x, y = target.train_x[idx], target.train_y[idx]
    grads = gi.client_gradients(target.model, x, y, batch_size, dropout, seed=seed + 1)
    t0 = time.perf_counter()
    recon, labels, failed = gi.invert(target.model, grads, method, batch_size, iterations, seed=seed,
                                      prior_image=target.test_x.mean(0))
    seconds = time.perf_counter() - t0
    _, _, m = gi.score(x, recon, y, labels, failed, batch_size)
    m['seconds'] = seconds
    return m


def line(name, m):
    return (f"{name:<34} PSNR {m['psnr_mean']:6.2f} mean {m['psnr_min']:6.2f} min | SSIM {m['ssim_mean']:.3f} | "
            f"labels {100 * m['label_accuracy']:5.1f}% | failed {m['n_failed']} | {m['seconds']:7.2f} s")


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
                   help=f'Adam steps for batch sizes > 1 (default: the attack\'s, {gi.BATCH_STEPS})')
    p.add_argument('--batch-sizes', default='1,2,4,8')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    try:
        target, run_dir = standard_target(args.data_dir, args.run_dir, tempfile.mkdtemp(prefix='bench_gi_'))
    except UserError as e:
        sys.exit(f'error: {e}')
    print(f"model: {run_dir} (test accuracy {target.history['final_test_accuracy']:.4f}), "
          f'{torch.get_num_threads()} threads')
    index, _ = gi.pick_images(target, args.images, args.seed)
    x = target.train_x[torch.as_tensor(index)]
    print(f"trivial guesses: gray 0.5 {psnr(torch.full_like(x, 0.5), x).mean():.2f} dB, dataset mean image "
          f"{psnr(target.train_x.mean(0, keepdim=True).expand_as(x), x).mean():.2f} dB")

    print(f'\n== batch size 1, {args.images} images, dropout off (the papers\' case)')
    k = min(args.idlg_images or args.images, args.images)
    idlg = attack(target, index[:k], 'idlg', 1, False, args.seed, args.idlg_iterations)
    print(line(f'plain iDLG ({args.idlg_iterations} L-BFGS), first {k}', idlg))
    idlg_total = idlg['seconds'] / k * args.images  # images are attacked one by one: time is linear in them
    ours = attack(target, index, 'default', 1, False, args.seed)
    print(line(f'default (batched), all {args.images}', ours))
    scaled = f'measured on {k}, scaled linearly' if k < args.images else 'measured'
    print(f"plain iDLG for {args.images} images: {idlg_total:.1f} s ({scaled}); "
          f"speed-up {idlg_total / ours['seconds']:.1f}x, PSNR {ours['psnr_mean'] - idlg['psnr_mean']:+.2f} dB "
          f"(default's mean over the same {k}: "
          f"{sum(p['psnr'] for p in ours['per_image'][:k]) / k:.2f} dB)")
    print('\n== batch size 1, dropout unknown (client in train mode, mask unknown to the server)')
    print(line('default (batched)', attack(target, index, 'default', 1, True, args.seed)))

    print('\n== batch-size curve, default attack (batches the fc1 gradient does not separate: cosine fallback)')
    for dropout in (False, True):
        for bs in [int(b) for b in args.batch_sizes.split(',')]:
            n_batches = max(1, args.images // bs)
            idx, _ = gi.pick_images(target, n_batches * bs, args.seed)
            iters = None if bs == 1 else args.curve_iterations
            name = f"bs {bs} ({n_batches} batches), dropout {'unknown' if dropout else 'off'}"
            print(line(name, attack(target, idx, 'default', bs, dropout, args.seed, iters)))


if __name__ == '__main__':
    main()
