"""Run a chosen set of attacks on one target; shared by run_all_attacks.py and the defense sweep."""
import importlib
import time

ATTACKS = {  # name -> (module, key in metrics.json)
    'gradient': ('src.attacks.gradient_inversion', 'gradient_inversion'),
    'model': ('src.attacks.model_inversion', 'model_inversion'),
    'gan': ('src.attacks.gan_inversion', 'gan_inversion'),
}


def add_arguments(parser):
    """Every attack's own flags, each under its heading."""
    for module, _ in ATTACKS.values():
        importlib.import_module(module).add_arguments(parser)


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
