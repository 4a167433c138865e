"""Train a tiny run, attack it with every attack, check every output file and the report."""
import json
import os

import jsonschema
import numpy as np
import pytest

import run_all_attacks
from src.federated import train
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ATTACKS = ['--gi-images', '2', '--gi-iterations', '10', '--gi-rounds-steps', '2', '--gi-map-steps', '2',
                '--mi-steps', '5', '--mi-restarts', '2', '--gmi-gan-steps', '20', '--gmi-steps', '5',
                '--gmi-restarts', '2', '--mia-shadows', '2', '--mia-candidates', '50', '--device', 'cpu']
EVERY_ATTACK = ['--attacks', 'gradient,model,gan,malicious,membership']  # membership is asked for by name


@pytest.fixture(scope='module')
def attacked(tmp_path_factory):
    from tests.conftest import make_idx_dir
    base = tmp_path_factory.mktemp('e2e')
    data_dir = make_idx_dir(base / 'data', n_train=300, n_test=200)
    train(tiny_config(data_dir, base / 'run'), log=lambda *a: None)
    out = base / 'attack_results'
    run_all_attacks.main(['--model', str(base / 'run' / 'global_model.pth'), '--output-dir', str(out),
                          '--cache-dir', str(base / 'cache'), *TINY_ATTACKS, *EVERY_ATTACK])
    return out


def test_every_declared_figure_and_file_is_written(attacked):
    from src.attacks.runner import all_attacks
    declared = {name for attack in all_attacks() for name in attack.figures}
    expected = declared | {'metrics.json', 'metrics.schema.json', 'reconstructions.npz', 'report.html',
                           '.fl-privacy-output.json'}
    assert set(os.listdir(attacked)) == expected  # nothing undeclared, nothing missing
    assert not [f for f in os.listdir(attacked.parent) if '.staging-' in f or '.old-' in f]


def test_metrics_validate_against_the_schema_the_attacks_declare(attacked):
    from src.attacks.runner import all_attacks, metrics_schema
    schema = json.loads((attacked / 'metrics.schema.json').read_text())
    assert schema == metrics_schema()
    metrics = json.loads((attacked / 'metrics.json').read_text())
    jsonschema.validate(metrics, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema has teeth
        jsonschema.validate({k: v for k, v in metrics.items() if k != 'versions'}, schema)
    for attack in all_attacks():  # every declared headline number is required
        path = attack.headline[0][0].split('.')
        broken = json.loads(json.dumps(metrics))
        leaf = broken[attack.key]
        for part in path[:-1]:
            leaf = leaf[part]
        del leaf[path[-1]]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_reconstructions_hold_the_images_behind_the_figures(attacked):
    arrays = np.load(attacked / 'reconstructions.npz')
    assert arrays['model_inversion/best_images'].shape == (10, 28, 28)
    assert arrays['gan_inversion/best_images'].shape == (10, 28, 28)
    gi = [k for k in arrays.files if k.startswith('gradient_inversion/')]
    assert gi and all(np.isfinite(arrays[k]).all() for k in gi if arrays[k].dtype.kind == 'f')


def test_report_shows_what_each_attack_declares(attacked):
    import html as html_lib
    from src.attacks.runner import all_attacks
    from src.report import format_value
    page = (attacked / 'report.html').read_text()
    metrics = json.loads((attacked / 'metrics.json').read_text())
    figures = [name for attack in all_attacks() for name in attack.figures]
    assert page.count('src="data:image/png;base64,') == 1 + len(figures)  # accuracy curve + every figure
    for attack in all_attacks():
        assert f'<h2>{html_lib.escape(attack.title)}</h2>' in page
        for name in attack.figures:
            assert f'alt="{name}"' in page
        for label, kind, value in attack.headline_values(metrics[attack.key]):
            assert value is not None, (attack.key, label)
            cell = f'<td>{html_lib.escape(label)}</td><td><b>{html_lib.escape(format_value(value, kind))}</b></td>'
            assert cell in page
    reading = page.split('What leaked')[1].split('</div>')[0]
    assert all(html_lib.escape(a.title) in reading for a in all_attacks())


def test_fedavg_rounds_attack_scores_every_update_against_its_baselines(attacked):
    import torch
    from src.attacks.target import load_attack_inputs
    from src.metrics import psnr
    result = json.loads((attacked / 'metrics.json').read_text())['gradient_inversion']['fedavg_rounds']
    rounds, k = result['rounds'], result['dummies_per_update']
    view, private = load_attack_inputs(str(attacked.parent / 'run' / 'global_model.pth'), device='cpu')
    prior = view.public_x.mean(0, keepdim=True)
    assert [r['round'] for r in rounds] == list(range(1, view.config['num_rounds'] + 1))
    for r in rounds:
        assert [c['client'] for c in r['clients']] == list(range(view.config['num_clients']))
        for c in r['clients']:
            real = private.client(c['client'])[0]
            assert c['black_image_psnr_max'] == pytest.approx(psnr(torch.zeros_like(real), real).max().item())
            nearest = real[(prior - real).pow(2).flatten(1).mean(1).topk(k, largest=False).indices]
            assert c['mean_image_psnr_mean'] == pytest.approx(psnr(prior.expand_as(nearest), nearest).mean().item())
            assert not c['failed'] and np.isfinite(c['psnr_mean']) and c['psnr_mean'] <= c['psnr_max']


def strip_volatile(obj):
    """Metrics without timings and cache state, which legitimately differ between runs."""
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items()
                if 'seconds' not in k and k not in ('from_cache', 'summary')}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def test_rerun_replaces_the_folder_whole_and_is_deterministic(attacked, tmp_path):
    first = json.loads((attacked / 'metrics.json').read_text())['model_inversion']
    assert (attacked / 'gradient_inversion_idlg.png').exists()
    run_all_attacks.main(['--model', str(attacked.parent / 'run' / 'global_model.pth'), '--output-dir',
                          str(attacked), '--cache-dir', str(attacked.parent / 'cache'), '--attacks', 'model',
                          *TINY_ATTACKS])
    assert not (attacked / 'gradient_inversion_idlg.png').exists()  # the earlier run's own file: replaced whole
    again = json.loads((attacked / 'metrics.json').read_text())
    assert 'gradient_inversion' not in again
    assert strip_volatile(again['model_inversion']) == strip_volatile(first)  # same seed, same numbers


def test_missing_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_all_attacks.main(['--model', str(tmp_path / 'nope.pth'), '--output-dir', str(tmp_path / 'out')])
    assert 'training history not found' in str(e.value) or 'not found' in str(e.value)
    assert not (tmp_path / 'out').exists()
