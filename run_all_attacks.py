"""Run the three privacy attacks on a trained global model, in sequence.

    python run_all_attacks.py [--model global_model.pth] [--attacks gradient,model,gan] [flags]

Writes to --output-dir (default attack_results/): gradient_inversion_idlg.png,
model_inversion_all.png, gan_inversion_all.png, gan_samples.png, metrics.json and
reconstructions.npz. Each attack's own flags are listed under its heading below.
"""
import argparse
import importlib
import os
import platform
import sys
import time

ATTACKS = {  # name -> (module, key in metrics.json)
    'gradient': ('src.attacks.gradient_inversion', 'gradient_inversion'),
    'model': ('src.attacks.model_inversion', 'model_inversion'),
    'gan': ('src.attacks.gan_inversion', 'gan_inversion'),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='global_model.pth', help='global model written by main.py')
    p.add_argument('--history', help='training_history.json (default: beside --model)')
    p.add_argument('--data-dir', help="the clients' data (default: the directory training used)")
    p.add_argument('--attacks', default='gradient,model,gan', help='comma-separated subset of gradient,model,gan')
    p.add_argument('--output-dir', default='attack_results')
    p.add_argument('--cache-dir', default='cache', help='trained evaluation classifier and GAN are kept here')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='auto')
    for module, _ in ATTACKS.values():
        importlib.import_module(module).add_arguments(p)
    args = p.parse_args(argv)
    args.attacks = [a.strip() for a in args.attacks.split(',') if a.strip()]
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown or not args.attacks:
        p.error(f"--attacks: unknown {unknown}; choose from {', '.join(ATTACKS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch

    from src.attacks.target import load_target
    from src.utils import UserError, atomic_path, save_json

    try:
        target = load_target(args.model, args.history, args.data_dir, args.device)
        results = {
            'model': os.path.abspath(args.model),
            'training_config': target.config,
            'training_final_test_accuracy': target.history['final_test_accuracy'],
            'seed': args.seed,
            'versions': {'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__},
        }
        arrays = {}
        for name in args.attacks:
            module, key = ATTACKS[name]
            print(f'== {key}')
            t0 = time.perf_counter()
            metrics, attack_arrays = importlib.import_module(module).run(target, args, args.output_dir)
            metrics.setdefault('seconds', time.perf_counter() - t0)
            results[key] = metrics
            arrays.update({f'{key}/{k}': v for k, v in attack_arrays.items()})
            print(f"{key}: {metrics.get('summary', '')} ({metrics['seconds']:.1f} s)")
        save_json(results, os.path.join(args.output_dir, 'metrics.json'))
        with atomic_path(os.path.join(args.output_dir, 'reconstructions.npz')) as tmp:
            with open(tmp, 'wb') as f:
                np.savez_compressed(f, **arrays)
        print(f'wrote metrics.json, reconstructions.npz and figures to {args.output_dir}')
    except UserError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
