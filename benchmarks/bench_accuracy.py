"""Final test accuracy of every preset x distribution, as the README reports them (speed: bench_training.py).

    python benchmarks/bench_accuracy.py --data-dir ../shared/data/mnist-10k [--fashion-dir ../shared/data/fashion-mnist]

Prints a markdown table. --fashion-dir adds standard/iid on Fashion-MNIST (60,000 images,
MNIST's size).
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from src.federated import train  # noqa: E402


def run(preset, distribution, dataset, data_dir):
    with tempfile.TemporaryDirectory() as out:
        cfg = config.resolve(preset, {'data_dir': data_dir, 'dataset': dataset, 'output_dir': out,
                                      'data_distribution': distribution, 'capture_rounds': 'none'})
        h = train(cfg, log=lambda *a: None)
    return (f"| {dataset} ({sum(c['num_samples'] for c in h['clients'])} train) | {preset} | {distribution} | "
            f"{h['final_test_accuracy'] * 100:.2f} % |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=os.path.join('..', 'shared', 'data', 'mnist-10k'))
    p.add_argument('--fashion-dir', help='also run standard/iid on this Fashion-MNIST directory')
    p.add_argument('--presets', default='quick,standard,extensive')
    p.add_argument('--distributions', default='iid,non_iid')
    args = p.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    print('| data | preset | distribution | final test accuracy |')
    print('| --- | --- | --- | --- |')
    for preset in args.presets.split(','):
        for distribution in args.distributions.split(','):
            print(run(preset, distribution, 'mnist', args.data_dir), flush=True)
    if args.fashion_dir:
        print(run('standard', 'iid', 'fashion-mnist', args.fashion_dir), flush=True)


if __name__ == '__main__':
    main()
