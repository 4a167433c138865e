"""Defenses against the attacks: the privacy-utility-leakage trade-off.

    python run_defense_sweep.py [--grid quick|full] [--config quick] [--data-dir DIR] [--set pruning=0.5,0.1]

Trains once per defense setting (plus once without defense), runs the attacks on each result,
and writes defense_sweep.json and defense_tradeoff.png to --output-dir (default defense_results/). Interrupted sweeps
resume at the first unfinished setting (each finished one is kept in its own folder).
"""
import argparse
import sys

import config
from src.attacks import runner
from src.data import DATASETS
from src.model import MODELS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--grid', choices=['quick', 'full'], default='quick')
    p.add_argument('--set', action='append', default=[], metavar='DEFENSE=V1,V2',
                   help='replace a defense\'s strengths, e.g. dp_sgd=8,1 (target epsilons) or pruning=0.3 (repeatable)')
    p.add_argument('--config', choices=sorted(config.PRESETS), default='quick', help='training preset')
    p.add_argument('--dataset', choices=list(DATASETS))
    p.add_argument('--data-dir')
    p.add_argument('--model', choices=list(MODELS), help='the target model (default cnn)')
    p.add_argument('--distribution', dest='data_distribution', choices=['iid', 'non_iid', 'shards', 'dirichlet'])
    p.add_argument('--malicious-attack', choices=['imprint', 'loki', 'fc1'],
                   help="the malicious server's crafted model, sent in one extra round after training (config.py)")
    runner.add_arguments(p, default_attacks=('gradient', 'model', 'gan', 'membership', 'malicious'))
    p.set_defaults(output_dir='defense_results')
    return runner.parse_args(p, argv)


def main(argv=None):
    args = parse_args(argv)
    from src.defense_sweep import GRIDS, sweep
    from src.utils import UserError

    grid = [list(g) for g in GRIDS[args.grid]]
    for item in args.set:
        name, _, values = item.partition('=')
        match = [g for g in grid if g[0] == name]
        if not match or not values:
            sys.exit(f"error: --set {item!r}: use DEFENSE=V1,V2 with DEFENSE one of {', '.join(g[0] for g in grid)}")
        match[0][2] = [float(v) for v in values.split(',')]
    cfg = config.resolve(args.config, {'dataset': args.dataset, 'data_dir': args.data_dir, 'model': args.model,
                                       'seed': args.seed,
                                       'data_distribution': args.data_distribution, 'device': args.device,
                                       'malicious_attack': args.malicious_attack})
    try:
        runner.check_args(args)
        sweep(cfg, args, grid, args.attacks, args.output_dir)
    except UserError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
