"""Run a chosen set of attacks on one target; shared by run_all_attacks.py and the defense sweep."""
import importlib
import time

ATTACKS = {  # name -> (module, key in metrics.json)
    'gradient': ('src.attacks.gradient_inversion', 'gradient_inversion'),
    'model': ('src.attacks.model_inversion', 'model_inversion'),
    'gan': ('src.attacks.gan_inversion', 'gan_inversion'),
}


def add_arguments(parser):
    """The flags every attack run shares, then every attack's own flags under its heading."""
    parser.add_argument('--attacks', default='gradient,model,gan', help='comma-separated subset of gradient,model,gan')
    parser.add_argument('--output-dir', default='attack_results')
    parser.add_argument('--cache-dir', default='cache', help='trained evaluation classifier and GAN are kept here')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='auto')
    for module, _ in ATTACKS.values():
        importlib.import_module(module).add_arguments(parser)


def parse_args(parser, argv=None):
    """Parse, turning --attacks into a checked list."""
    args = parser.parse_args(argv)
    args.attacks = [a.strip() for a in args.attacks.split(',') if a.strip()]
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown or not args.attacks:
        parser.error(f"--attacks: unknown {unknown}; choose from {', '.join(ATTACKS)}")
    return args


def check_args(args):
    """Pre-flight for the shared and per-attack flags: a seed every RNG accepts, no NaN or infinite values."""
    from src.utils import check_finite, check_seed
    check_seed(args.seed)
    check_finite(vars(args), {k: '--' + k.replace('_', '-') for k in vars(args)})


def run_attacks(target, args, out_dir, names, log=print):
    """(metrics by key, arrays by 'key/name') for the attacks in `names`, in order."""
    results, arrays = {}, {}
    for name in names:
        module, key = ATTACKS[name]
        log(f'== {key}')
        t0 = time.perf_counter()
        metrics, attack_arrays = importlib.import_module(module).run(target, args, out_dir)
        metrics.setdefault('seconds', time.perf_counter() - t0)
        results[key] = metrics
        arrays.update({f'{key}/{k}': v for k, v in attack_arrays.items()})
        log(f"{key}: {metrics.get('summary', '')} ({metrics['seconds']:.1f} s)")
    return results, arrays
