"""GAN training and membership shadow models on a GPU: launch-bound loops, and what replaces them (issue 16).

    python benchmarks/bench_cuda_graphs.py [--steps 600] [--repeats 3]

train_gan (src/attacks/gan_prior.py) on 10,000 images of 28x28, batch 64, run with graph=False and
graph=True in this same run, fp32 and at the precision the attack uses ('auto': bf16 on recent GPUs).
Prints steps/s (median of --repeats runs after one warm-up) and the ratio, and how far the graph's
weights are from the eager run's after --steps steps: both draw the same batches and latents, so
in fp32 they agree to rounding, which a GAN's training amplifies over hundreds of steps; so a check first
compares them after --check-steps steps in fp32 with cuDNN's TF32 off.

Then the membership attack's shadow models (src/attacks/membership.py train_models): --shadows CNNs, each
on its own 2,500 images for --shadow-passes passes of batch 64, one after another (client_update) against
all as one computation (src/batched_training.py), with the largest weight difference. Needs CUDA.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.attacks import gan_prior as gp  # noqa: E402
from src.attacks import membership as mia  # noqa: E402
from src.utils import resolve_precision  # noqa: E402


def train(images, steps, precision, graph):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    G, D, history = gp.train_gan(images, seed=0, steps=steps, precision=precision, device='cuda', progress=False,
                                 graph=graph)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, G, D, history


def max_difference(a, b):
    """Largest difference between two (G, D, history) runs' floating-point weights and statistics."""
    return max((x - y).abs().max().item() for m_a, m_b in zip(a[:2], b[:2])
               for x, y in zip(m_a.state_dict().values(), m_b.state_dict().values()) if x.is_floating_point())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=600)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--check-steps', type=int, default=50)
    p.add_argument('--check-only', action='store_true', help='the check, not the speed table')
    p.add_argument('--shadows', type=int, default=17, help="the attack's default: 16 shadows + 1 reference")
    p.add_argument('--shadow-passes', type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit('error: no CUDA device here')
    images = (np.random.default_rng(0).random((10_000, 28, 28)) * 255).astype(np.uint8)
    print(f"{time.strftime('%Y-%m-%d')}: {torch.cuda.get_device_name()}, torch {torch.__version__}; GAN training, "
          f"{args.steps} steps of batch 64, median of {args.repeats}", flush=True)
    torch.backends.cudnn.allow_tf32 = False
    for steps in (1, args.check_steps):
        runs = [train(images, steps, 'fp32', graph)[1:] for graph in (False, True)]
        print(f'check, fp32 without TF32, {steps} steps: max |w diff| graph vs eager {max_difference(*runs):.1e}; '
              f'loss histories equal: {runs[0][2] == runs[1][2]}', flush=True)
    torch.backends.cudnn.allow_tf32 = True
    if args.check_only:
        return
    print('precision | eager steps/s | CUDA graph steps/s | graph / eager | max |w diff| graph vs eager')
    print('--- | --- | --- | --- | ---')
    for precision in ('fp32', resolve_precision('auto', torch.device('cuda'))):
        rates, models = {}, {}
        for graph in (False, True):
            train(images, 10, precision, graph)  # warm-up: cuDNN's choices, the allocator
            runs = [train(images, args.steps, precision, graph) for _ in range(args.repeats)]
            rates[graph] = args.steps / statistics.median(r[0] for r in runs)
            models[graph] = runs[0][1:]
        diff = max_difference(models[False], models[True])
        ratio = rates[True] / rates[False]
        print(f'{precision} | {rates[False]:,.0f} | {rates[True]:,.0f} | {ratio:.1f}x | {diff:.1e}', flush=True)
    shadows(args.shadows, args.shadow_passes)


def shadows(count, passes):
    g = torch.Generator().manual_seed(0)
    pool_x = torch.rand(5000, 1, 28, 28, generator=g).cuda()
    pool_y = torch.randint(0, 10, (5000,), generator=g).cuda()
    recipe, times, states = (passes, 64, 0.01), {}, {}
    for batched in (False, True, False, True):  # the first of each is the warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        states[batched] = mia.train_models(pool_x, pool_y, count, 2500, recipe, 0, torch.device('cuda'),
                                           batched=batched)
        torch.cuda.synchronize()
        times[batched] = time.perf_counter() - t0
    diff = max((a[k] - b[k]).abs().max().item() for a, b in zip(states[False], states[True]) for k in a)
    print(f'\nmembership shadows ({count} CNNs x {passes} passes over 2,500 images, batch 64, '
          f'{resolve_precision("auto", torch.device("cuda"))}): one after another {times[False]:.2f} s, '
          f'as one computation {times[True]:.2f} s ({times[False] / times[True]:.1f}x); max |w diff| {diff:.1e}',
          flush=True)


if __name__ == '__main__':
    main()
