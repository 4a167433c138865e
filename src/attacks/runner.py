"""Run a chosen set of attacks (src.attacks.base.Attack) on one trained model; shared by
run_all_attacks.py and the defense sweep. Everything attack-specific comes from the registry."""
import dataclasses
import importlib
import time

import torch

ATTACKS = {  # --attacks name -> 'module:Class'; adding an attack is one line here and one file
    'gradient': 'src.attacks.gradient_inversion:GradientInversion',
    'model': 'src.attacks.model_inversion:ModelInversion',
    'gan': 'src.attacks.gan_inversion:GanInversion',
    'malicious': 'src.attacks.malicious_server:MaliciousServer',  # skips (one note) without crafted rounds
    'membership': 'src.attacks.membership:MembershipInference',
}
# what --attacks runs when not given: membership inference trains 17 models, so it is asked for by name
DEFAULT_ATTACKS = ('gradient', 'model', 'gan', 'malicious')


def get(name):
    """The Attack instance registered as `name`."""
    module, cls = ATTACKS[name].split(':')
    return getattr(importlib.import_module(module), cls)()


def all_attacks():
    return [get(name) for name in ATTACKS]


def add_arguments(parser, default_attacks=DEFAULT_ATTACKS):
    """The flags every attack run shares, then every attack's own flags under its heading."""
    parser.add_argument('--attacks', default=','.join(default_attacks),
                        help=f"comma-separated subset of {','.join(ATTACKS)} (default: {','.join(default_attacks)})")
    parser.add_argument('--output-dir', default='attack_results')
    parser.add_argument('--cache-dir', default='cache', help='trained evaluation classifiers and GANs are kept here')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='auto')
    for attack in all_attacks():
        attack.add_arguments(parser)


def parse_args(parser, argv=None):
    """Parse, turning --attacks into a checked list."""
    args = parser.parse_args(argv)
    args.attacks = [a.strip() for a in args.attacks.split(',') if a.strip()]
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown or not args.attacks:
        parser.error(f"--attacks: unknown {unknown}; choose from {', '.join(ATTACKS)}")
    return args


def check_args(args):
    """Pre-flight for the shared and per-attack flags: a seed every RNG accepts, no NaN or infinite
    values, and each chosen attack's own checks. Raises UserError before any work starts."""
    from src.utils import check_finite, check_seed
    check_seed(args.seed)
    check_finite(vars(args), {k: '--' + k.replace('_', '-') for k in vars(args)})
    for name in args.attacks:
        get(name).check(args)


def run_attacks(view, private, args, out_dir, names, log=print):
    """(metrics by key, arrays by 'key/name') for the attacks in `names`, in order.

    Each attack's run() gets the server's view only; what clients send (observe) is simulated on the
    clients' side first, and the private data reaches score() alone.
    """
    for name in names:
        get(name).check_data(args, view)
    results, arrays = {}, {}
    for name in names:
        attack = get(name)
        log(f'== {attack.key}')
        t0 = time.perf_counter()
        observation = attack.observe(private, view, args)
        attack_view = dataclasses.replace(view, observed=observation.sent if observation else None)
        if observation and observation.public_withheld is not None:
            keep = torch.ones(len(view.public_y), dtype=torch.bool, device=view.public_y.device)
            keep[torch.as_tensor(observation.public_withheld, device=keep.device)] = False
            attack_view = dataclasses.replace(attack_view, public_x=view.public_x[keep], public_y=view.public_y[keep])
        result = attack.run(attack_view, args)
        report = attack.score(result, private, observation.truth if observation else None, attack_view, args, out_dir)
        report.metrics['seconds'] = time.perf_counter() - t0
        results[attack.key] = report.metrics
        arrays.update({f'{attack.key}/{k}': v for k, v in report.arrays.items()})
        log(f"{attack.key}: {report.metrics.get('summary', '')} ({report.metrics['seconds']:.1f} s)")
    return results, arrays


def write_results(view, private, args, out_dir, model_path, log=print):
    """Run args.attacks and write metrics.json (+ its schema), reconstructions.npz, report.html and every
    attack's figures into out_dir. Returns the metrics."""
    import os
    import platform

    import numpy as np

    from src.report import write_report
    from src.utils import atomic_path, save_json
    attack_metrics, arrays = run_attacks(view, private, args, out_dir, args.attacks, log)
    results = {
        'model': os.path.abspath(model_path),
        'training_config': view.config,
        'training_final_test_accuracy': view.training['final_test_accuracy'],
        'training_defenses': view.training.get('defenses', []),
        'seed': args.seed,
        'attack_settings': {k: v for k, v in vars(args).items() if k not in ('model', 'history')},
        'versions': {'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__},
        **attack_metrics,
    }
    save_json(results, os.path.join(out_dir, 'metrics.json'))
    save_json(metrics_schema(), os.path.join(out_dir, 'metrics.schema.json'))
    with atomic_path(os.path.join(out_dir, 'reconstructions.npz')) as tmp, open(tmp, 'wb') as f:
        np.savez_compressed(f, **arrays)
    write_report(os.path.join(out_dir, 'report.html'), results, view.training, out_dir,
                 [get(name) for name in args.attacks])
    return results


def metrics_schema():
    """JSON schema of metrics.json, built from what the registered attacks declare."""
    kinds = {'fraction': {'type': ['number', 'null'], 'minimum': 0, 'maximum': 1},
             'db': {'type': ['number', 'null']}, 'seconds': {'type': 'number', 'minimum': 0},
             'number': {'type': ['number', 'null']}}

    def nested(path, leaf):
        head, _, rest = path.partition('.')
        return {'type': 'object', 'required': [head], 'properties': {head: nested(rest, leaf) if rest else leaf}}

    properties = {}
    for attack in all_attacks():
        required = {'type': 'object', 'required': ['summary', 'seconds', 'seed', 'threat_model'],
                    'properties': {'summary': {'type': 'string'}, 'seconds': kinds['seconds'],
                                   'threat_model': {'type': 'object'}}}
        properties[attack.key] = {'allOf': [required] + [nested(p, kinds[k]) for p, _, k in attack.headline]}
    return {
        '$schema': 'https://json-schema.org/draft/2020-12/schema',
        'title': 'attack_results/metrics.json',
        'type': 'object',
        'required': ['model', 'training_config', 'training_final_test_accuracy', 'training_defenses', 'seed',
                     'attack_settings', 'versions'],
        'properties': {'training_final_test_accuracy': kinds['fraction'], 'seed': {'type': 'integer'},
                       'training_defenses': {'type': 'array', 'items': {'type': 'string'}}, **properties},
    }
