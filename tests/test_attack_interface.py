"""The attack interface: what the attacker may see, the registry driving report/sweep/schema, layering."""
import argparse
import ast
import dataclasses
import glob
import os

import pytest
import torch

from src.attacks import runner
from src.attacks.base import Attack, AttackerView, PrivateData
from tests.conftest import make_idx_dir, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--gi-images', '2', '--gi-iterations', '5', '--gi-rounds-steps', '2', '--gi-map-steps', '2', '--mi-steps', '3',
        '--mi-restarts', '1',
        '--gmi-gan-steps', '5', '--gmi-steps', '3', '--gmi-restarts', '1', '--mia-shadows', '2', '--mia-candidates', '50',
        '--device', 'cpu']


def test_the_attackers_view_has_no_field_for_private_data():
    fields = {f.name for f in dataclasses.fields(AttackerView)}
    assert not fields & {'train_x', 'train_y', 'client_indices'}
    assert not [f for f in fields if f.startswith('train_') or 'client' in f or 'private' in f]
    # its only images are the public split's
    assert {f.name for f in dataclasses.fields(AttackerView) if f.type is torch.Tensor} == {'public_x', 'public_y'}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    from src.federated import train
    base = tmp_path_factory.mktemp('iface')
    data_dir = make_idx_dir(base / 'data', n_train=300, n_test=200)
    train(tiny_config(data_dir, base / 'run'), log=lambda *a: None)
    return base


@pytest.mark.parametrize('name', list(runner.ATTACKS))
def test_each_attack_runs_on_the_view_alone(name, trained, tmp_path):
    """observe() is the clients' side; run() gets a view built without any private field, and the
    private data object is gone before it runs."""
    from src.attacks.target import load_attack_inputs
    attack = runner.get(name)
    assert isinstance(attack, Attack) and attack.key and attack.title and attack.figures and attack.headline
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = runner.parse_args(parser, ['--attacks', name, '--cache-dir', str(tmp_path / 'cache'), *TINY])
    view, private = load_attack_inputs(str(trained / 'run' / 'global_model.pth'), device='cpu',
                                       cache_dir=str(tmp_path / 'cache'))
    observation = attack.observe(private, view, args)
    truth = observation.truth if observation else None
    bare = AttackerView(model=view.model, training=view.training, captured=view.captured, public_x=view.public_x,
                        public_y=view.public_y, dataset=view.dataset, device=view.device, cache_dir=view.cache_dir,
                        observed=observation.sent if observation else None)
    result = attack.run(bare, args)
    report = attack.score(result, private, truth, bare, args, str(tmp_path))
    assert {'summary', 'threat_model', 'seed'} <= set(report.metrics)
    assert all(value is not None for _, _, value in attack.headline_values(report.metrics))
    assert all((tmp_path / f).exists() for f in attack.figures if f != 'gradient_inversion_rounds.png'
               or args.gi_rounds)


def test_adding_an_attack_is_one_registry_line(monkeypatch, trained, tmp_path):
    """A new Attack subclass registered by one line shows up in the flags, the run, the schema and the report."""
    import json
    import sys
    import types

    class Blank(Attack):
        name, key, title = 'blank', 'blank_baseline', 'Black image (no attack)'
        figures = ()
        headline = (('psnr', 'PSNR of a black image to the clients\' images', 'db'),)

        def add_arguments(self, parser):
            parser.add_argument_group('blank').add_argument('--blank-level', type=float, default=0.0)

        def run(self, view, settings):
            import torch
            return torch.full((1, 1, 28, 28), settings.blank_level, device=view.device)

        def score(self, result, private, truth, view, settings, out_dir):
            from src.attacks.base import Report
            from src.metrics import psnr
            x, _ = private.clients()
            return Report({'psnr': psnr(result.expand_as(x), x).mean().item(), 'summary': 'a black image',
                           'threat_model': {'knows': 'nothing'}, 'seed': settings.seed})

    module = types.ModuleType('blank_attack')
    module.Blank = Blank
    monkeypatch.setitem(sys.modules, 'blank_attack', module)
    monkeypatch.setitem(runner.ATTACKS, 'blank', 'blank_attack:Blank')
    import run_all_attacks
    out = tmp_path / 'out'
    run_all_attacks.main(['--model', str(trained / 'run' / 'global_model.pth'), '--output-dir', str(out),
                          '--attacks', 'blank', '--blank-level', '0', '--cache-dir', str(tmp_path / 'cache')])
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['blank_baseline']['psnr'] > 0
    assert 'blank_baseline' in json.loads((out / 'metrics.schema.json').read_text())['properties']
    assert 'Black image (no attack)' in (out / 'report.html').read_text()


def _imports(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f'{node.module}.{a.name}' for a in node.names}  # a submodule, where one is named
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_layering_no_import_circles_and_src_never_imports_config():
    graph = {}
    for path in glob.glob(os.path.join(ROOT, 'src', '**', '*.py'), recursive=True):
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.').removesuffix('.__init__')
        imports = _imports(path)
        assert 'config' not in imports, f'{module} imports the top-level config.py'
        graph[module] = {m for m in imports if m.startswith('src.')}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for m in graph.get(todo.pop(), ()):
                if m in graph and m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    circles = [m for m in graph if m in reach(m)]
    assert not circles, f'import circles through {circles}'
