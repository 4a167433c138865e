"""Training speed and accuracy: the project's trainer against a plain per-client PyTorch loop.

Both train the same clients (same config, split, seed and initial weights), one after another.
The plain loop is the honest baseline a researcher would write: data preloaded as tensors,
shuffled index slices of batch 64, fp32, default layout and threads, plain SGD.

    python benchmarks/bench_training.py --data-dir ../shared/data/mnist-10k [--config standard]
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=os.path.join('..', 'shared', 'data', 'mnist-10k'))
    p.add_argument('--dataset', default='mnist')
    p.add_argument('--config', default='standard', choices=sorted(config.PRESETS))
    p.add_argument('--distribution', default='iid')
    p.add_argument('--rounds', type=int, help='fewer rounds for a shorter measurement')
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = config.resolve(args.config, {'data_dir': args.data_dir, 'dataset': args.dataset, 'output_dir': out,
                                           'data_distribution': args.distribution, 'num_rounds': args.rounds,
                                           'capture_rounds': 'none', 'device': 'cpu'})
        data = load_dataset(cfg['dataset'], cfg['data_dir'], download=False)
        history = train(cfg, log=lambda *a: None)
    ours = history['samples_per_second']
    plain_acc, plain = plain_loop(cfg, data)
    print(f"{args.config} {args.distribution} on {args.data_dir} ({len(data.train_labels)} train images), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain loop (fp32, NCHW):     {plain:8.0f} samples/s   final test accuracy {plain_acc:.4f}")
    print(f"project ({history['precision']}, channels_last): {ours:8.0f} samples/s   "
          f"final test accuracy {history['final_test_accuracy']:.4f}")
    print(f"speed-up: {ours / plain:.2f}x   accuracy difference: {history['final_test_accuracy'] - plain_acc:+.4f}")


if __name__ == '__main__':
    main()
