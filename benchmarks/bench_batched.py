"""Local-training speed on one device, issue 16's table: the plain per-client loop, the project's
sequential trainer, and the batched trainer (all K clients as one computation) in three variants.

    python benchmarks/bench_batched.py                 # on CUDA: K = 5, 10, 20, 300 steps per client
    python benchmarks/bench_batched.py --quick         # a small run that also works on CPU

Every variant trains the same K clients (random images, batch 64, one epoch of --steps batches
each, from one seeded global model) and reports samples/s, the median of --repeats timed runs
after one untimed warm-up (cuDNN autotuning, the CUDA graph's capture). The plain loop is the
baseline a researcher would write — fp32, default layout, torch.optim.SGD, one client after
another — measured in this same run; it and the sequential trainer train one client at a time, so
they are measured at the smallest K only. Before the table, a correctness check on a small round:
how far the batched trainer's weights are from the sequential trainer's on this device.
"""
import argparse
import copy
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import src.batched_training as bt  # noqa: E402
import src.federated as fed  # noqa: E402
from src.data import MNIST_SPEC  # noqa: E402
from src.model import CNN  # noqa: E402
from src.utils import derive_seed, resolve_precision  # noqa: E402
from bench_training import plain_client  # noqa: E402

BATCH = 64


def make_clients(k, n, device):
    """K clients of n random images each (the speed does not depend on what the pixels show)."""
    g = torch.Generator().manual_seed(k)
    x = torch.rand(k * n, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (k * n,), generator=g).to(device)
    return [(x[c * n:(c + 1) * n], y[c * n:(c + 1) * n]) for c in range(k)]


def settings(k, device, trainer):
    return config.resolve(None, {'num_clients': k, 'local_epochs': 1, 'batch_size': BATCH, 'device': str(device),
                                 'trainer': trainer, 'capture_rounds': 'none'})


def plain_loop(clients, global_state):
    """One client after another, written the plain way (bench_training's plain client, one epoch)."""
    model = CNN().to(clients[0][0].device)
    for c, (x, y) in enumerate(clients):
        model.load_state_dict(global_state)
        plain_client(model, x, y, 1, BATCH, 0.01, torch.Generator().manual_seed(c))


def project_round(clients, trainer, precision, graph=True, channels_last=True):
    """Round 1 of the project's train_round with `trainer`, as train() sets it up; returns its results."""
    device = clients[0][0].device
    cfg = settings(len(clients), device, trainer)
    model, global_state = fed.init_model(cfg, MNIST_SPEC, device)
    models = [model] + [copy.deepcopy(model) for _ in range(fed.parallel_clients(cfg, device, len(clients)) - 1)]
    bt.CUDA_GRAPH, bt.CHANNELS_LAST = graph, channels_last
    try:
        return fed.train_round(cfg, models, global_state, clients, 1, precision, [[] for _ in clients]), global_state
    finally:
        bt.CUDA_GRAPH, bt.CHANNELS_LAST = True, True


def samples_per_second(fn, samples, repeats, device):
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    fn()  # warm-up, not timed
    seconds = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - t0)
    return samples / statistics.median(seconds)


def max_difference(a, b):
    return max((sa[k] - sb[k]).abs().max().item() for (sa, _, _), (sb, _, _) in zip(a, b) for k in sa)


def relative_difference(a, b, global_state):
    return max(((sa[k] - sb[k]).norm() / (sb[k] - global_state[k]).norm()).item()
               for (sa, _, _), (sb, _, _) in zip(a, b) for k in sa)


def correctness(device, steps):
    """Batched vs sequential on this device, one round of 3 clients, dropout on."""
    clients = make_clients(3, steps * BATCH, device)
    seq32, g = project_round(clients, 'sequential', 'fp32')
    bat32 = project_round(clients, 'batched', 'fp32')[0]
    lines = [f'batched fp32 vs sequential fp32: max |w diff| {max_difference(bat32, seq32):.1e}']
    if device.type == 'cuda':  # the graph's replay against the same step run eagerly
        graphed = project_round(clients, 'batched', 'fp32')[0]
        eager = project_round(clients, 'batched', 'fp32', graph=False)[0]
        lines.append(f'batched fp32, CUDA graph vs eager: max |w diff| {max_difference(graphed, eager):.1e}')
        torch.backends.cudnn.allow_tf32 = False  # cuDNN's fp32 convolutions round to TF32 by default
        try:
            seq, bat = project_round(clients, 'sequential', 'fp32')[0], project_round(clients, 'batched', 'fp32')[0]
        finally:
            torch.backends.cudnn.allow_tf32 = True
        lines.append(f'batched fp32 vs sequential fp32, cuDNN TF32 off: max |w diff| {max_difference(bat, seq):.1e}')
    seq16, _ = project_round(clients, 'sequential', 'bf16')
    bat16 = project_round(clients, 'batched', 'bf16')[0]
    lines.append(f'batched bf16 vs sequential bf16: largest |w diff| / |update| '
                 f'{relative_difference(bat16, seq16, g):.3f} (sequential bf16 vs fp32: '
                 f'{relative_difference(seq16, seq32, g):.3f})')
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--clients', type=int, nargs='+', default=[5, 10, 20], help='K values (columns)')
    p.add_argument('--steps', type=int, default=300, help='batches of 64 per client')
    p.add_argument('--repeats', type=int, default=3, help='timed runs per cell; the median is reported')
    p.add_argument('--device', default='auto')
    p.add_argument('--quick', action='store_true', help='K = 2, 3; 10 steps; 1 repeat (works on CPU)')
    p.add_argument('--check-only', action='store_true', help='the correctness check, not the speed table')
    args = p.parse_args()
    if args.quick:
        args.clients, args.steps, args.repeats = [2, 3], 10, 1
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    cuda = device.type == 'cuda'
    name = torch.cuda.get_device_name(device) if cuda else f'CPU, {torch.get_num_threads()} threads'
    print(f"{time.strftime('%Y-%m-%d')}: {name}, torch {torch.__version__}; {args.steps} steps of batch {BATCH} "
          f"per client, median of {args.repeats}", flush=True)
    try:
        for line in correctness(device, 5 if args.quick else 20):
            print('check: ' + line, flush=True)
    except Exception as e:  # reported; the speed table still runs
        print(f'check failed: {type(e).__name__}: {e}', flush=True)
    if args.check_only:
        return

    precision = resolve_precision('auto', device)
    graph = '+ CUDA graph ' if cuda else '(CPU: no CUDA graph) '
    rows = [
        ('plain loop, one client after another (fp32)', 'plain', None),
        (f'project sequential trainer ({precision}, channels_last)', 'sequential', dict(precision=precision)),
        ('batched, fp32, no graph', 'batched', dict(precision='fp32', graph=False, channels_last=False)),
        (f'batched {graph}+ bf16', 'batched', dict(precision='bf16', channels_last=False)),
        (f'batched {graph}+ bf16 + channels_last (default)', 'batched', dict(precision='bf16')),
    ]
    table = {label: [] for label, _, _ in rows}
    for i, k in enumerate(args.clients):
        clients = make_clients(k, args.steps * BATCH, device)
        samples = k * args.steps * BATCH
        torch.manual_seed(derive_seed(0, 'init'))
        global_state = {key: v.to(device) for key, v in CNN().state_dict().items()}
        for label, trainer, options in rows:
            if trainer != 'batched' and i > 0:  # one client at a time: the same speed for every K
                table[label].append('(same)')
                continue
            if trainer == 'plain':
                fn = functools.partial(plain_loop, clients, global_state)
            else:
                fn = functools.partial(project_round, clients, trainer, **options)
            try:
                table[label].append(f'{samples_per_second(fn, samples, args.repeats, device):,.0f}')
            except Exception as e:  # a failed variant is reported, and the others still run
                table[label].append(f'failed: {type(e).__name__}')
                print(f'{label}, K = {k}: {type(e).__name__}: {e}', flush=True)
        print(f'K = {k} done', flush=True)
        del clients, fn
        bt._captured[0] = None  # let the next K's data and graph take this one's memory

    print('\nsamples/s | ' + ' | '.join(f'K = {k}' for k in args.clients))
    print('--- | ' + ' | '.join('---' for _ in args.clients))
    for label, cells in table.items():
        print(f'{label} | ' + ' | '.join(cells))
    plain = float(table[rows[0][0]][0].replace(',', '')) if table[rows[0][0]][0][0].isdigit() else None
    if plain:
        default = table[rows[-1][0]]
        print('**default batched / plain loop** | ' + ' | '.join(
            f'{float(c.replace(",", "")) / plain:.1f}x' if c[0].isdigit() else '-' for c in default))


if __name__ == '__main__':
    main()
