"""Training speed and accuracy: the project's trainer against a plain per-client PyTorch loop.

Both train the same clients (same config, split, seed and initial weights), one after another.
The plain loop is the honest baseline a researcher would write: data preloaded as tensors,
shuffled index slices of batch 64, fp32, default layout and threads, plain SGD.

    python benchmarks/bench_training.py --data-dir ../shared/data/mnist-10k [--config standard] [--trainer batched]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from common import spread  # noqa: E402
from src.data import load_dataset, to_tensor  # noqa: E402
from src.federated import train  # noqa: E402
from src.model import CNN  # noqa: E402
from src.partition import partition  # noqa: E402
from src.server import evaluate, fedavg  # noqa: E402
from src.utils import derive_seed  # noqa: E402


def plain_loop(cfg, data):
    """FedAvg written the plain way; returns (final test accuracy, samples/s of local training)."""
    parts = partition(data.train_labels, cfg['num_clients'], cfg['data_distribution'],
                      derive_seed(cfg['seed'], 'partition'), cfg['dirichlet_alpha'])
    x, y = to_tensor(data.train_images), torch.from_numpy(data.train_labels.astype(np.int64))
    tx, ty = to_tensor(data.test_images), torch.from_numpy(data.test_labels.astype(np.int64))
    torch.manual_seed(derive_seed(cfg['seed'], 'init'))
    model = CNN()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    train_seconds, samples = 0.0, 0
    for r in range(1, cfg['num_rounds'] + 1):
        states, sizes = [], []
        for c, p in enumerate(parts):
            cx, cy = x[p], y[p]
            model.load_state_dict(global_state)
            model.train()
            torch.manual_seed(derive_seed(cfg['seed'], 'dropout', r, c))
            g = torch.Generator().manual_seed(derive_seed(cfg['seed'], 'shuffle', r, c))
            opt = torch.optim.SGD(model.parameters(), lr=cfg['learning_rate'])
            t0 = time.perf_counter()
            for _ in range(cfg['local_epochs']):
                order = torch.randperm(len(p), generator=g)
                for s in range(0, len(p), cfg['batch_size']):
                    idx = order[s:s + cfg['batch_size']]
                    loss = F.cross_entropy(model(cx[idx]), cy[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            train_seconds += time.perf_counter() - t0
            samples += len(p) * cfg['local_epochs']
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            sizes.append(len(p))
        global_state = fedavg(states, sizes)
    model.load_state_dict(global_state)
    return evaluate(model, tx, ty)[1], samples / train_seconds


def plain_client(model, x, y, epochs, batch_size, lr, generator):
    """One client's local training written the plain way (fp32, default layout)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(x.device)
        for s in range(0, len(y), batch_size):
            idx = order[s:s + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def interleaved_speed(cfg, data, pairs=5):
    """Samples/s of the plain loop and of client_update, measured in alternating pairs on the same
    client, so a machine whose speed drifts (shared hosts do) biases neither side."""
    from src.client import client_update
    from src.utils import resolve_device, resolve_precision
    precision = resolve_precision(cfg['precision'], resolve_device('cpu'))
    p = partition(data.train_labels, cfg['num_clients'], cfg['data_distribution'],
                  derive_seed(cfg['seed'], 'partition'), cfg['dirichlet_alpha'])[0]
    x, y = to_tensor(data.train_images[p]), torch.from_numpy(data.train_labels[p].astype(np.int64))
    n = len(p) * cfg['local_epochs']
    ratios, plain_rates, ours_rates = [], [], []
    fast = CNN().to(memory_format=torch.channels_last)
    for i in range(pairs + 1):  # the first pair warms both up and is not counted
        t0 = time.perf_counter()
        plain_client(CNN(), x, y, cfg['local_epochs'], cfg['batch_size'], cfg['learning_rate'],
                     torch.Generator().manual_seed(i))
        t1 = time.perf_counter()
        client_update(fast, x, y, cfg['local_epochs'], cfg['batch_size'], cfg['learning_rate'], precision,
                      torch.Generator().manual_seed(i))
        t2 = time.perf_counter()
        if i:
            plain_rates.append(n / (t1 - t0))
            ours_rates.append(n / (t2 - t1))
            ratios.append((t1 - t0) / (t2 - t1))
    return float(np.median(plain_rates)), float(np.median(ours_rates)), float(np.median(ratios)), precision


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=os.path.join('..', 'shared', 'data', 'mnist-10k'))
    p.add_argument('--dataset', default='mnist')
    p.add_argument('--config', default='standard', choices=sorted(config.PRESETS))
    p.add_argument('--distribution', default='iid')
    p.add_argument('--rounds', type=int, help='fewer rounds for a shorter measurement')
    p.add_argument('--repeats', type=int, default=3, help='whole comparisons to run; the median and range are reported')
    p.add_argument('--trainer', choices=['auto', 'sequential', 'batched'],
                   help="the project's trainer for the whole run (default: config.py's, 'auto' = sequential on CPU)")
    args = p.parse_args()
    whole, local = [], []
    print(f"{args.config} {args.distribution} on {args.data_dir}, trainer {args.trainer or config.CONFIG['trainer']}, "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    for run in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            cfg = config.resolve(args.config, {'data_dir': args.data_dir, 'dataset': args.dataset, 'output_dir': out,
                                               'data_distribution': args.distribution, 'num_rounds': args.rounds,
                                               'capture_rounds': 'none', 'device': 'cpu', 'trainer': args.trainer})
            data = load_dataset(cfg['dataset'], cfg['data_dir'], download=False)
            history = train(cfg, log=lambda *a: None)
        ours = history['samples_per_second']
        plain_acc, plain = plain_loop(cfg, data)
        plain_rate, ours_rate, ratio, precision = interleaved_speed(cfg, data)
        whole.append(ours / plain)
        local.append(ratio)
        print(f"run {run + 1}: whole run plain {plain:.0f} samples/s (accuracy {plain_acc:.4f}), project "
              f"({history['precision']}, channels_last) {ours:.0f} samples/s (accuracy "
              f"{history['final_test_accuracy']:.4f}): {ours / plain:.2f}x; one client, 5 alternating pairs: "
              f"plain {plain_rate:.0f}, project {ours_rate:.0f} samples/s: {ratio:.2f}x", flush=True)
    print(f'speed-up, whole federated run: {spread(whole, "x")}')
    print(f'speed-up, one client (median of 5 alternating pairs per run): {spread(local, "x")}')


if __name__ == '__main__':
    main()
