"""What the attack benchmarks share: the trained standard model they attack."""
import os
import statistics

import config
from src.attacks.target import load_attack_inputs


def target_arguments(parser):
    """--data-dir (the real digits) and --run-dir (a trained standard model; default: train one now)."""
    root = os.environ.get('FL_REAL_DATA', '../shared/data')
    parser.add_argument('--data-dir', default=os.path.join(root, 'mnist-10k'))
    parser.add_argument('--run-dir', help='folder with global_model.pth and training_history.json (default: train one)')


def standard_target(data_dir, run_dir, tmp, cache_dir='cache', device='cpu'):
    """(view, private, run_dir): the attacker's view of the global model in `run_dir` and the clients'
    data (for scoring), or with run_dir None the standard preset trained now into `tmp` (a temporary
    folder the caller owns)."""
    if run_dir is None:
        from src.federated import train
        run_dir = tmp
        print(f'training the standard model on {data_dir} into a temporary folder ...')
        train(config.resolve('standard', {'data_dir': data_dir, 'output_dir': tmp}), log=lambda *a: None)
    view, private = load_attack_inputs(os.path.join(run_dir, 'global_model.pth'), data_dir=data_dir, device=device,
                                       cache_dir=cache_dir)
    return view, private, run_dir


def spread(values, unit='s', digits=2):
    """'median unit (range min-max, n runs)': how every speed figure is reported, never the best run alone."""
    v = list(values)
    return (f'{statistics.median(v):.{digits}f} {unit} (range {min(v):.{digits}f}-{max(v):.{digits}f}, '
            f'{len(v)} run{"s" if len(v) > 1 else ""})')
