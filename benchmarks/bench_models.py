"""Every model of the registry (src/model.py), trained and attacked as a user runs it: one table.

    python benchmarks/bench_models.py --data-dir ../shared/data/mnist-10k [--models cnn,mlp,lenet] [--json OUT]

For each model: `main.py --config quick --model M` (seed 0), then run_all_attacks.py with its defaults:
gradient inversion at batch size 1 with each method (dlg, idlg, default; dropout unknown to the server),
model inversion and GMI. Printed: test accuracy and every attack's headline numbers beside its no-attack
baseline. Then the speed of the default attack's inner loop (its feature distance, forward and backward) on the
CNN: its written-out path (search.py) against the model-agnostic torch.func path every other model takes
(layers.py), measured in the same run.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import run_all_attacks  # noqa: E402
from src.attacks.gan_inversion import GanInversion  # noqa: E402
from src.attacks.gradient_inversion import clients, layers, search  # noqa: E402
from src.attacks.gradient_inversion.closed_form import recover_fc_input  # noqa: E402
from src.attacks.model_inversion import ModelInversion  # noqa: E402
from src.federated import train  # noqa: E402
from src.model import CNN, MODELS  # noqa: E402
from src.utils import save_json  # noqa: E402

METHODS = ('dlg', 'idlg', 'default')


def attack(run_dir, out, cache, *flags):
    run_all_attacks.main(['--model', os.path.join(run_dir, 'global_model.pth'), '--output-dir', out,
                          '--cache-dir', cache, '--device', 'cpu', *flags])
    with open(os.path.join(out, 'metrics.json')) as f:
        return json.load(f)


def one_model(name, data_dir, tmp, cache):
    """Train the quick preset with model `name`, run every attack; the row of the table."""
    run_dir = os.path.join(tmp, name)
    t0 = time.perf_counter()
    history = train(config.resolve('quick', {'data_dir': data_dir, 'output_dir': run_dir, 'model': name}),
                    log=lambda *a: None)
    weights = torch.load(os.path.join(run_dir, 'global_model.pth'), weights_only=True)
    row = {'model': name, 'parameters': sum(v.numel() for v in weights.values()),
           'test_accuracy': history['final_test_accuracy'], 'train_seconds': time.perf_counter() - t0}
    for method in METHODS:
        flags = ['--attacks', 'gradient,model,gan'] if method == 'default' else [
            '--attacks', 'gradient', '--gi-method', method, '--no-gi-rounds']
        m = attack(run_dir, os.path.join(tmp, f'{name}-{method}'), cache, *flags)
        gi = m['gradient_inversion']['main']
        keys = ('recovered_30db', 'recovered_25db', 'psnr_mean', 'psnr_min', 'label_accuracy', 'seconds')
        row[f'gi_{method}'] = {k: gi[k] for k in keys}
        if method == 'default':
            row['gi_no_attack_psnr'] = m['gradient_inversion']['baselines']['dataset_mean_psnr_mean']
            for key, attack_cls in (('model_inversion', ModelInversion), ('gan_inversion', GanInversion)):
                row[key] = {label: value for label, _, value in attack_cls().headline_values(m[key])}
                row[key]['seconds'] = m[key]['seconds']
    return row


def feature_search_speed(repeats=5, n=20):
    """Seconds per feature distance (forward and backward to the images) of n images on the CNN: its
    written-out path against torch.func on the same weights, images and targets: (written-out, torch.func)."""

    class Generic(CNN):  # the CNN as the attack sees any other model
        pass

    torch.manual_seed(0)
    model, generic = CNN().eval(), Generic().eval()
    generic.load_state_dict(model.state_dict())
    x, y = torch.rand(n, 1, 28, 28), torch.arange(n) % 10
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    a2 = recover_fc_input(grads['fc1.weight'], grads['fc1.bias'])
    G = (grads['fc1.bias'] @ model.fc1.weight).detach()
    times = {'hand': [], 'func': []}
    with layers.frozen(model), layers.frozen(generic):
        for _ in range(repeats):
            for key, m in (('hand', model), ('func', generic)):
                start = torch.rand(n, 1, 28, 28, requires_grad=True)
                t0 = time.perf_counter()
                d, _ = search.feature_distance(m, start, a2, G, *search.conv_targets(m, grads))
                d.sum().backward()
                times[key].append(time.perf_counter() - t0)
    return times['hand'], times['func']


def fmt(v, kind):
    if v is None:
        return '-'
    return f'{100 * v:.0f} %' if kind == 'pct' else f'{v:.1f}'


def pair(headline, i, j):
    """'attack / no attack' from two of an attack's headline numbers (by position in its declaration)."""
    values = list(headline.values())
    return f"{fmt(values[i], 'pct')} / {fmt(values[j], 'pct')}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=os.path.join('..', 'shared', 'data', 'mnist-10k'))
    p.add_argument('--models', default=','.join(MODELS), help='comma-separated registry names')
    p.add_argument('--json', help='write the table and the speed ratio here')
    args = p.parse_args()
    names = [n for n in args.models.split(',') if n]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, 'cache')  # shared: the evaluators and GANs depend on the data, not the model
        for name in names:
            print(f'== {name}', flush=True)
            rows.append(one_model(name, args.data_dir, tmp, cache))
    print('\n| model | parameters | test accuracy | GI dlg: >= 30 dB / mean dB | GI idlg | GI default | '
          'GI labels (default) | no attack: mean image dB | MI attack / no attack | MI classes 0-4 | '
          'GMI attack / no attack | GMI class-disjoint |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for r in rows:
        gi = [f"{fmt(r[f'gi_{m}']['recovered_30db'], 'pct')} / {fmt(r[f'gi_{m}']['psnr_mean'], 'db')}"
              for m in METHODS]
        print(f"| {r['model']} | {r['parameters']:,} | {100 * r['test_accuracy']:.2f} % | {' | '.join(gi)} | "
              f"{fmt(r['gi_default']['label_accuracy'], 'pct')} | {fmt(r['gi_no_attack_psnr'], 'db')} | "
              f"{pair(r['model_inversion'], 0, 1)} | {pair(r['model_inversion'], 2, 3)} | "
              f"{pair(r['gan_inversion'], 0, 2)} | {pair(r['gan_inversion'], 3, 4)} |")
    hand, func = feature_search_speed()
    ratio = statistics.median(func) / statistics.median(hand)
    print(f'\nthe default attack\'s feature distance on the CNN (20 images, forward + backward): written out '
          f'{1000 * statistics.median(hand):.1f} ms, torch.func {1000 * statistics.median(func):.1f} ms '
          f'(median of 5): {ratio:.2f}x')
    total = time.perf_counter() - started
    print(f'total {total / 60:.1f} min')
    if args.json:
        save_json({'models': rows, 'feature_distance_seconds': {'written_out': hand, 'torch_func': func},
                   'written_out_speedup': ratio, 'seconds': total}, args.json)


if __name__ == '__main__':
    main()
