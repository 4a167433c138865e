import json
import os
import subprocess
import sys

import pytest
import torch

import config
from src.federated import train, validate
from src.model import CNN
from src.server import CuriousServer, fedavg, parse_capture_rounds
from src.utils import UserError
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_presets_match_the_readme():
    for name, (clients, rounds, epochs) in {'quick': (3, 3, 2), 'standard': (5, 10, 5),
                                             'extensive': (10, 20, 10)}.items():
        cfg = config.resolve(name)
        assert (cfg['num_clients'], cfg['num_rounds'], cfg['local_epochs']) == (clients, rounds, epochs)
        assert cfg['batch_size'] == 64 and cfg['learning_rate'] == 0.01


def test_fedavg_is_sample_weighted_mean():
    torch.manual_seed(0)
    states = [{k: torch.randn_like(v) for k, v in CNN().state_dict().items()} for _ in range(3)]
    sizes = [10, 30, 60]
    avg = fedavg(states, sizes)
    for k in avg:
        expected = (10 * states[0][k] + 30 * states[1][k] + 60 * states[2][k]) / 100
        torch.testing.assert_close(avg[k], expected)


def test_curious_server_keeps_exact_updates():
    g = {'w': torch.zeros(3)}
    server = CuriousServer({1}, {'batch_size': 64})
    server.aggregate(1, g, [0, 1], [{'w': torch.ones(3)}, {'w': 3 * torch.ones(3)}], [1, 3])
    server.aggregate(2, g, [0], [{'w': torch.ones(3)}], [1])  # round 2 is not kept
    record = server.record()
    assert [r['round'] for r in record['rounds']] == [1]
    torch.testing.assert_close(record['rounds'][0]['updates'][1]['delta']['w'], 3 * torch.ones(3))
    assert record['rounds'][0]['updates'][1]['num_samples'] == 3


def test_capture_rounds_parsing():
    assert parse_capture_rounds('all', 3) == {1, 2, 3}
    assert parse_capture_rounds('none', 3) == set()
    assert parse_capture_rounds('1,3', 3) == {1, 3}
    with pytest.raises(ValueError):
        parse_capture_rounds('4', 3)


@pytest.mark.parametrize('override, message', [
    ({'num_clients': 0}, '--clients'), ({'learning_rate': -0.1}, '--lr'),
    ({'data_distribution': 'weird'}, '--distribution'), ({'dirichlet_alpha': 0}, '--alpha'),
    ({'num_rounds': 0}, '--rounds'), ({'capture_rounds': '99'}, '--capture-rounds')])
def test_impossible_configs_are_refused(override, message, tmp_path):
    cfg = tiny_config('unused', tmp_path, **override)
    with pytest.raises(UserError, match=message):
        validate(cfg)


def test_more_clients_than_images(idx_dir, tmp_path):
    with pytest.raises(UserError, match='only 300 training images'):
        train(tiny_config(idx_dir, tmp_path, num_clients=301), log=lambda *a: None)


def test_end_to_end_quick_run_writes_loadable_files(idx_dir, tmp_path):
    history = train(tiny_config(idx_dir, tmp_path, data_distribution='non_iid'), log=lambda *a: None)
    state = torch.load(tmp_path / 'global_model.pth', weights_only=True)
    CNN().load_state_dict(state)
    record = torch.load(tmp_path / 'captured_updates.pt', weights_only=True)
    assert [r['round'] for r in record['rounds']] == [1, 2]
    assert len(record['rounds'][0]['updates']) == 3
    saved = json.loads((tmp_path / 'training_history.json').read_text())
    assert saved['config']['data_distribution'] == 'non_iid'
    assert [r['round'] for r in saved['rounds']] == [1, 2]
    assert all(len(c['class_counts']) == 10 and sum(c['class_counts']) == c['num_samples'] for c in saved['clients'])
    assert saved['classes_held_by_no_client'] and len(saved['classes_held_by_no_client']) == 4
    assert history['final_test_accuracy'] == saved['rounds'][-1]['test_accuracy']
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_update_record_reproduces_the_fedavg_model(idx_dir, tmp_path):
    train(tiny_config(idx_dir, tmp_path, num_rounds=1), log=lambda *a: None)
    record = torch.load(tmp_path / 'captured_updates.pt', weights_only=True)
    final = torch.load(tmp_path / 'global_model.pth', weights_only=True)
    rnd = record['rounds'][0]
    states = [{k: rnd['global_state'][k] + u['delta'][k] for k in final} for u in rnd['updates']]
    rebuilt = fedavg(states, [u['num_samples'] for u in rnd['updates']])
    for k in final:
        torch.testing.assert_close(rebuilt[k], final[k], rtol=0, atol=1e-6)


def test_training_learns_and_is_deterministic(idx_dir, tmp_path):
    quiet = lambda *a: None  # noqa: E731
    a = train(tiny_config(idx_dir, tmp_path / 'a', num_rounds=3, local_epochs=3, learning_rate=0.05), log=quiet)
    b = train(tiny_config(idx_dir, tmp_path / 'b', num_rounds=3, local_epochs=3, learning_rate=0.05), log=quiet)
    assert a['final_test_accuracy'] > 0.8  # the synthetic classes are easy
    strip = lambda h: [(r['test_loss'], r['test_accuracy']) for r in h['rounds']]  # noqa: E731
    assert strip(a) == strip(b)
    assert a['partition'] == b['partition']
    sa = torch.load(tmp_path / 'a' / 'global_model.pth', weights_only=True)
    sb = torch.load(tmp_path / 'b' / 'global_model.pth', weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_main_help_lists_every_flag():
    out = subprocess.run([sys.executable, 'main.py', '--help'], cwd=ROOT, capture_output=True, text=True, check=True)
    for flag in ['--config', '--distribution', '--data-dir', '--dataset', '--clients', '--rounds', '--local-epochs',
                 '--batch-size', '--lr', '--seed', '--device', '--output-dir', '--alpha', '--capture-rounds']:
        assert flag in out.stdout


def test_main_bad_data_is_one_line(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'train-images-idx3-ubyte.gz').write_bytes(b'not gzip at all')
    out = subprocess.run([sys.executable, 'main.py', '--config', 'quick', '--data-dir', str(empty),
                          '--output-dir', str(tmp_path / 'out')], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and 'train-images-idx3-ubyte.gz' in lines[0]
    assert not (tmp_path / 'out').exists()


def test_real_digits_one_round(real_data, tmp_path):
    cfg = tiny_config(os.path.join(real_data, 'mnist-10k'), tmp_path, num_rounds=1, local_epochs=1, num_clients=2,
                     learning_rate=0.05)
    history = train(cfg, log=lambda *a: None)
    assert history['final_test_accuracy'] > 0.85


def test_clients_in_parallel_threads_equal_sequential(idx_dir, tmp_path):
    """Two clients at once (one intra-op thread each) give bit-identical weights to one at a time."""
    quiet = lambda *a: None  # noqa: E731
    cfg = dict(num_rounds=2, local_epochs=2, precision='fp32')
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # -> one client at a time
        train(tiny_config(idx_dir, tmp_path / 'seq', **cfg), log=quiet)
        torch.set_num_threads(2)  # -> two clients at a time
        train(tiny_config(idx_dir, tmp_path / 'par', **cfg), log=quiet)
    finally:
        torch.set_num_threads(before)
    a = torch.load(tmp_path / 'seq' / 'global_model.pth', weights_only=True)
    b = torch.load(tmp_path / 'par' / 'global_model.pth', weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
