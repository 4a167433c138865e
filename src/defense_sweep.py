"""Which defense, at what cost, stops which attack: train under each defense setting, attack the
result with every attack (membership inference and, through one crafted round after training, the
malicious server included), and tabulate utility against leakage.

Each grid point is written to its own folder (`<sweep>/<point>/`: the model, history, attack
figures and point.json) atomically, so an interrupted sweep resumes at the first missing point.
"""
import argparse
import json
import os
import textwrap
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src.attacks.runner import get, write_results  # noqa: E402
from src.attacks.target import load_attack_inputs  # noqa: E402
from src.federated import train  # noqa: E402
from src.utils import atomic_dir, atomic_path, check_output_dir, save_json  # noqa: E402

# (defense, the setting it varies, strengths from weak to strong); 'none' is the shared baseline.
GRIDS = {
    'quick': [
        ('dp_sgd', 'dp_epsilon', [8.0, 3.0]),  # at the tuned dp_* settings (config.py)
        ('update_clip_noise', 'update_noise', [0.01, 0.1]),
        ('pruning', 'keep_fraction', [0.1, 0.01]),
        ('secure_aggregation', 'secure_aggregation', [True]),
    ],
    'full': [
        ('dp_sgd', 'dp_epsilon', [8.0, 3.0, 1.0]),
        ('update_clip_noise', 'update_noise', [0.003, 0.01, 0.03, 0.1]),
        ('pruning', 'keep_fraction', [0.5, 0.2, 0.1, 0.01]),
        ('secure_aggregation', 'secure_aggregation', [True]),
    ],
}
UPDATE_CLIP = 1.0  # the bound update_noise is scaled by


def grid_points(grid):
    """[(point name, defense, setting, strength, config overrides)], baseline first."""
    points = [('none', 'none', None, 0, {})]
    for defense, setting, strengths in grid:
        for value in strengths:
            overrides = {setting: value}
            if setting == 'update_noise':
                overrides['update_clip'] = UPDATE_CLIP
            name = defense if isinstance(value, bool) else f'{defense}-{setting}={value}'
            points.append((name, defense, setting, value, overrides))
    return points


def with_crafted_round(cfg):
    """cfg plus one crafted round after the last honest one, for the malicious-server attack: the clients
    train it (and, under DP, spend privacy on it: the noise is set for every round they train), the server
    reads it out and does not aggregate it, so the final model is the one the honest rounds trained."""
    rounds = cfg['num_rounds'] + 1
    return dict(cfg, server='malicious', malicious_rounds=str(rounds), num_rounds=rounds)


def summarise(metrics, attacks):
    """The numbers the trade-off is judged by: every headline number each attack declares,
    as {'<metrics key>.<path>': value}."""
    out = {}
    for name in attacks:
        attack = get(name)
        if attack.key in metrics:
            for (path, _, _), (_, _, value) in zip(attack.headline, attack.headline_values(metrics[attack.key])):
                out[f'{attack.key}.{path}'] = value
    return out


def settings(cfg):
    return {k: v for k, v in cfg.items() if k != 'output_dir'}


def run_point(base_cfg, overrides, attack_args, attacks, folder, log):
    with atomic_dir(folder, 'defense_sweep point') as staging:
        cfg = dict(base_cfg, **overrides, output_dir=staging)
        history = train(cfg, log=log)
        model_path = os.path.join(staging, 'global_model.pth')
        view, private = load_attack_inputs(model_path, device=cfg['device'], cache_dir=attack_args.cache_dir)
        # the leakage map measures the undefended protocol, the same at every point: not re-run per defense
        attack_args = argparse.Namespace(**dict(vars(attack_args), attacks=attacks, gi_map='none'))
        metrics = write_results(view, private, attack_args, os.path.join(staging, 'attacks'), model_path, log)
        point = {'config': settings(cfg), 'attacks': attacks, 'overrides': overrides, 'defenses': history['defenses'],
                 'privacy': history['privacy'], 'test_accuracy': history['final_test_accuracy'],
                 'train_seconds': history['wall_seconds'], **summarise(metrics, attacks)}
        save_json(point, os.path.join(staging, 'point.json'))
    return point


def sweep(base_cfg, attack_args, grid, attacks=('gradient', 'model', 'gan', 'membership', 'malicious'),
          out_dir='defense_results', log=tqdm.write):
    """Run (or resume) the sweep over `grid` (a GRIDS value); write defense_sweep.json and
    defense_tradeoff.png to out_dir. Points are kept in out_dir/defense_sweep/<point>/, named by
    their settings, so a changed grid reuses the points it shares with an earlier one."""
    started = time.perf_counter()
    check_output_dir(out_dir, 'run_defense_sweep')
    sweep_dir = os.path.join(out_dir, 'defense_sweep')
    if 'malicious' in attacks and base_cfg.get('model', 'cnn') != 'cnn':
        log(f"the malicious server is built for the cnn: no crafted round for --model {base_cfg['model']}")
        attacks = tuple(a for a in attacks if a != 'malicious')
    if 'malicious' in attacks:
        base_cfg = with_crafted_round(base_cfg)
    rows = []
    for name, defense, setting, value, overrides in tqdm(grid_points(grid), desc='defense sweep'):
        folder = os.path.join(sweep_dir, name)
        done = os.path.join(folder, 'point.json')
        point = None
        if os.path.isfile(done):
            try:
                with open(done) as f:
                    point = json.load(f)
            except (OSError, ValueError):
                point = {}  # unreadable: redo
            same = settings(dict(base_cfg, **overrides)), list(attacks)
            if isinstance(point, dict) and (point.get('config'), point.get('attacks')) == same:
                log(f'{name}: done earlier, reusing')
            else:
                point = None  # made with other settings: redo
        if point is None:
            log(f'== {name}')
            point = run_point(base_cfg, overrides, attack_args, list(attacks), folder, log)
        rows.append(dict(point, point=name, defense=defense, setting=setting, strength=value))
    result = {'grid': [list(g) for g in grid], 'base_config': base_cfg, 'attacks': list(attacks), 'points': rows,
              'seconds_this_run': time.perf_counter() - started,
              'columns': {f'{a.key}.{p}': label for a in map(get, attacks) for p, label, _ in a.headline}}
    save_json(result, os.path.join(out_dir, 'defense_sweep.json'))
    plot_tradeoff(rows, os.path.join(out_dir, 'defense_tradeoff.png'), list(attacks))
    return result


def plot_tradeoff(rows, path, attacks):
    """Test accuracy, then each attack's first headline number: a line per defense from no defense
    (level 0) to its strongest setting; an attack's no-attack baseline, where it declares one, dashed."""
    baseline = rows[0]
    panels = [('test_accuracy', 'model test accuracy', None)]
    for attack in map(get, attacks):
        metric, label, kind = attack.headline[0]
        first = f'{attack.key}.{metric}'
        no_attack = [f'{attack.key}.{p}' for p, lab, k in attack.headline if lab.startswith('no attack') and k == kind]
        panels.append((first, f'{attack.key}: {label}', no_attack[0] if no_attack else None))
    panels = [p for p in panels if baseline.get(p[0]) is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    defenses = [d for d in dict.fromkeys(r['defense'] for r in rows) if d != 'none']
    for ax, (key, title, no_attack) in zip(axes[0], panels):
        for defense in defenses:
            pts = [baseline] + [r for r in rows if r['defense'] == defense]
            ax.plot(range(len(pts)), [p.get(key) for p in pts], marker='o',
                    label=f"{defense} ({', '.join(str(p['strength']) for p in pts[1:])})")
        if no_attack and baseline.get(no_attack) is not None:
            ax.axhline(baseline[no_attack], color='gray', ls='--', label='no attack (baseline)')
        ax.set_title(textwrap.fill(title, 48), fontsize=9)
        ax.set_xlabel('defense strength (0 = none)')
        ax.set_xticks(range(1 + max([sum(r['defense'] == d for r in rows) for d in defenses] or [0])))
        ax.grid(alpha=.3)
    axes[0][-1].legend(fontsize=7, loc='best')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)
