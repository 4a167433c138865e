"""Final test accuracy of every preset x distribution, as the README reports them (speed: bench_training.py).

    python benchmarks/bench_accuracy.py --data-dir ../shared/data/mnist-10k [--fashion-dir ../shared/data/fashion-mnist]
    python benchmarks/bench_accuracy.py --fashion-only --fashion-dir DIR --trainers sequential,batched   # on a GPU

Prints a markdown table. --fashion-dir adds standard/iid on Fashion-MNIST (60,000 images,
MNIST's size). --trainers runs every row with each trainer (src/batched_training.py), so the batched
GPU trainer's accuracy is compared with the sequential one's on the same device.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from src.federated import train  # noqa: E402


def run(preset, distribution, dataset, data_dir, trainer):
    with tempfile.TemporaryDirectory() as out:
        cfg = config.resolve(preset, {'data_dir': data_dir, 'dataset': dataset, 'output_dir': out,
                                      'data_distribution': distribution, 'capture_rounds': 'none',
                                      'trainer': trainer})
        h = train(cfg, log=lambda *a: None)
    return (f"| {dataset} ({sum(c['num_samples'] for c in h['clients'])} train) | {preset} | {distribution} | "
            f"{trainer} | {h['final_test_accuracy'] * 100:.2f} % | {h['wall_seconds']:.0f} s |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=os.path.join('..', 'shared', 'data', 'mnist-10k'))
    p.add_argument('--fashion-dir', help='also run standard/iid on this Fashion-MNIST directory')
    p.add_argument('--presets', default='quick,standard,extensive')
    p.add_argument('--distributions', default='iid,non_iid')
    p.add_argument('--trainers', default='auto', help="comma-separated --trainer values, each run on every row")
    p.add_argument('--fashion-only', action='store_true', help='only the Fashion-MNIST row(s) of --fashion-dir')
    p.add_argument('--fashion-distributions', default='iid')
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'{torch.get_num_threads()} CPU threads'
    print(f'torch {torch.__version__}, {device}')
    print('| data | preset | distribution | trainer | final test accuracy | training time |')
    print('| --- | --- | --- | --- | --- | --- |')
    trainers = args.trainers.split(',')
    for preset in [] if args.fashion_only else args.presets.split(','):
        for distribution in args.distributions.split(','):
            for trainer in trainers:
                print(run(preset, distribution, 'mnist', args.data_dir, trainer), flush=True)
    if args.fashion_dir:
        for distribution in args.fashion_distributions.split(','):
            for trainer in trainers:
                print(run('standard', distribution, 'fashion-mnist', args.fashion_dir, trainer), flush=True)


if __name__ == '__main__':
    main()
