import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
from src.client import client_update
from src.data import load_dataset, to_tensor
from src.federated import train, validate
from src.model import CNN
from src.server import CuriousServer, evaluate, fedavg, parse_capture_rounds
from src.utils import UserError, derive_seed
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_presets_match_the_readme():
    for name, (clients, rounds, epochs) in {'quick': (3, 3, 2), 'standard': (5, 10, 5),
                                             'extensive': (10, 20, 10)}.items():
        cfg = config.resolve(name)
        assert (cfg['num_clients'], cfg['num_rounds'], cfg['local_epochs']) == (clients, rounds, epochs)
        assert cfg['batch_size'] == 64 and cfg['learning_rate'] == 0.01


def test_fedavg_is_sample_weighted_mean():
    """Hand-computed on tiny tensors whose weighted mean is exact in fp32 (weights 1/4, 3/4)."""
    a = {'w': torch.tensor([4.0, -8.0, 0.5]), 'b': torch.tensor([[1.0], [2.0]])}
    b = {'w': torch.tensor([8.0, 0.0, 2.5]), 'b': torch.tensor([[-3.0], [6.0]])}
    avg = fedavg([a, b], [1, 3])
    assert set(avg) == {'w', 'b'}
    assert torch.equal(avg['w'], torch.tensor([7.0, -2.0, 2.0]))  # (1*a + 3*b) / 4; a plain mean gives 6,-4,1.5
    assert torch.equal(avg['b'], torch.tensor([[-2.0], [5.0]]))
    assert avg['w'].dtype == torch.float32 and avg['b'].shape == (2, 1)
    # the weights follow the sample counts, not the clients' positions
    assert torch.equal(fedavg([b, a], [3, 1])['w'], avg['w'])
    assert torch.equal(fedavg([a, b], [3, 1])['w'], torch.tensor([5.0, -6.0, 1.0]))
    # one client, or clients that agree, give that very state back
    assert torch.equal(fedavg([a], [17])['w'], a['w'])
    assert torch.equal(fedavg([b, b, b], [5, 1, 9])['b'], b['b'])
    # the inputs are left as they were
    assert torch.equal(a['w'], torch.tensor([4.0, -8.0, 0.5])) and torch.equal(b['w'], torch.tensor([8.0, 0.0, 2.5]))


def test_fedavg_of_model_states_matches_a_direct_sum():
    torch.manual_seed(0)
    states = [{k: torch.randn_like(v) for k, v in CNN().state_dict().items()} for _ in range(3)]
    avg = fedavg(states, [10, 30, 60])
    assert set(avg) == set(states[0])
    for k in avg:
        expected = (10 * states[0][k].double() + 30 * states[1][k].double() + 60 * states[2][k].double()) / 100
        torch.testing.assert_close(avg[k].double(), expected, rtol=0, atol=1e-6)


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


def independent_round(cfg, data, indices, global_state, r=1):
    """Round r redone by hand: each client is a fresh model loaded with `global_state` and trained by
    client_update with its own (seed, round, client) generators. Returns [(state, num_samples)]."""
    x_all = to_tensor(data.train_images)
    y_all = torch.from_numpy(data.train_labels.astype(np.int64))
    out = []
    for c, idx in enumerate(indices):
        model = CNN().to(memory_format=torch.channels_last)
        model.load_state_dict(global_state)
        model.dropout.generator = torch.Generator().manual_seed(derive_seed(cfg['seed'], 'dropout', r, c))
        shuffle = torch.Generator().manual_seed(derive_seed(cfg['seed'], 'shuffle', r, c))
        out.append(client_update(model, x_all[idx], y_all[idx], cfg['local_epochs'], cfg['batch_size'],
                                 cfg['learning_rate'], 'fp32', shuffle))
    return out


def test_one_round_is_the_weighted_mean_of_independent_client_updates(idx_dir, tmp_path):
    """train() with K clients == the sample-weighted mean of K separate client_update calls from the same
    global model with the same seeds, bit for bit in fp32; and the record holds exactly those updates."""
    cfg = tiny_config(idx_dir, tmp_path, num_rounds=1, local_epochs=1, precision='fp32',
                      data_distribution='dirichlet')  # unequal client sizes, so weighting matters
    history = train(cfg, log=lambda *a: None)
    final = torch.load(tmp_path / 'global_model.pth', weights_only=True)
    record = torch.load(tmp_path / 'captured_updates.pt', weights_only=True)
    indices = history['partition']['indices']
    sizes = [len(i) for i in indices]
    assert len(set(sizes)) == 3 and sum(sizes) == 300

    torch.manual_seed(derive_seed(cfg['seed'], 'init'))
    g = CNN().state_dict()
    rnd = record['rounds'][0]
    assert all(torch.equal(rnd['global_state'][k], g[k]) for k in g)  # round 1 starts from the seeded init

    clients = independent_round(cfg, load_dataset('mnist', idx_dir), indices, g)
    states = [s for s, _ in clients]
    assert [n for _, n in clients] == sizes
    assert [u['num_samples'] for u in rnd['updates']] == sizes and [u['client'] for u in rnd['updates']] == [0, 1, 2]
    for u, s in zip(rnd['updates'], states):  # the server keeps each client's exact update
        assert all(torch.equal(u['delta'][k], s[k] - g[k]) for k in g)

    assert set(final) == set(g)
    expected = fedavg(states, sizes)  # fedavg itself is checked against hand values above
    assert all(torch.equal(final[k], expected[k]) for k in g)
    for k in g:  # and the same, within an ulp, as a weighted mean written out here
        by_hand = sum(n / 300 * s[k].double() for n, s in zip(sizes, states))
        torch.testing.assert_close(final[k].double(), by_hand, rtol=1e-6, atol=1e-7)
    # the clients really moved, differently, and a plain mean is not what was taken
    assert not torch.equal(states[0]['fc2.weight'], g['fc2.weight'])
    assert not torch.equal(states[0]['fc2.weight'], states[1]['fc2.weight'])
    plain = sum(s['fc2.weight'] for s in states) / 3
    assert (plain - final['fc2.weight']).abs().max() > 1e-5


def test_client_update_is_plain_sgd_and_scales_with_lr():
    """One full-batch epoch is one SGD step: new = old - lr * grad, with grad computed here independently
    (same shuffle, same dropout mask); lr 0 changes nothing, and the step is proportional to lr."""
    torch.manual_seed(3)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    start = {k: v.clone() for k, v in CNN().state_dict().items()}

    def update(lr):
        model = CNN()
        model.load_state_dict(start)
        model.dropout.generator = torch.Generator().manual_seed(11)
        state, n = client_update(model, x, y, epochs=1, batch_size=6, lr=lr, generator=torch.Generator().manual_seed(5))
        assert n == 6 and set(state) == set(start)
        return {k: state[k].double() - start[k].double() for k in start}

    ref = CNN()
    ref.load_state_dict(start)
    ref.train()
    ref.dropout.generator = torch.Generator().manual_seed(11)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    loss = F.cross_entropy(ref(x[order]), y[order])
    names = [k for k, _ in ref.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(ref.parameters()))))
    assert set(grads) == set(start)  # no buffers: every entry is a parameter SGD moves

    assert all(torch.equal(v, torch.zeros_like(v)) for v in update(0.0).values())  # lr 0: nothing moves
    small, large = update(0.01), update(0.02)
    for k in start:  # fp32 weights of magnitude < 1 round at ~6e-8
        torch.testing.assert_close(small[k], -0.01 * grads[k].double(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(large[k], 2 * small[k], rtol=1e-4, atol=2e-7)
    assert min(grads[k].abs().max().item() for k in names) > 1e-4  # so the checks above are not vacuous


def test_client_update_matches_a_hand_written_sgd_loop():
    """Two epochs, uneven batches (4 + 2 of 6 images), reshuffled each epoch from the generator: the result equals
    plain minibatch SGD written out here (no momentum, no skipped remainder batch, no extra step)."""
    torch.manual_seed(4)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    start = {k: v.clone() for k, v in CNN().state_dict().items()}
    lr = 0.05

    model = CNN()
    model.load_state_dict(start)
    model.dropout.generator = torch.Generator().manual_seed(11)
    state, _ = client_update(model, x, y, epochs=2, batch_size=4, lr=lr, generator=torch.Generator().manual_seed(5))

    ref = CNN()
    ref.load_state_dict(start)
    ref.train()
    ref.dropout.generator = torch.Generator().manual_seed(11)
    shuffle = torch.Generator().manual_seed(5)
    params = list(ref.parameters())
    steps = 0
    for _ in range(2):
        order = torch.randperm(6, generator=shuffle)
        for idx in (order[:4], order[4:]):
            grads = torch.autograd.grad(F.cross_entropy(ref(x[idx]), y[idx]), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * g
            steps += 1
    assert steps == 4
    expected = ref.state_dict()
    for k in start:
        torch.testing.assert_close(state[k], expected[k], rtol=1e-5, atol=1e-6)
    assert max((expected[k] - start[k]).abs().max().item() for k in start) > 1e-3  # it did move


def untrained_accuracy(out_dir, data_dir):
    """(loss, accuracy) of the global model round 1 started from, as its captured record holds it."""
    model = CNN()
    model.load_state_dict(torch.load(os.path.join(out_dir, 'captured_updates.pt'), weights_only=True)['rounds'][0]
                          ['global_state'])
    data = load_dataset('mnist', data_dir)
    return evaluate(model, to_tensor(data.test_images), torch.from_numpy(data.test_labels.astype(np.int64)))


def test_training_learns_and_is_deterministic(idx_dir, tmp_path):
    quiet = lambda *a: None  # noqa: E731
    cfg = dict(num_rounds=3, local_epochs=3, learning_rate=0.05)
    a = train(tiny_config(idx_dir, tmp_path / 'a', **cfg), log=quiet)
    b = train(tiny_config(idx_dir, tmp_path / 'b', **cfg), log=quiet)
    # a no-op aggregation (the global model sent back unchanged) would stay exactly at the untrained model
    loss0, acc0 = untrained_accuracy(tmp_path / 'a', idx_dir)
    assert acc0 < 0.3
    accs = [r['test_accuracy'] for r in a['rounds']]
    assert accs[-1] >= acc0 + 0.6 and accs[-1] > 0.9  # the synthetic classes are easy
    assert a['rounds'][-1]['test_loss'] < 0.5 * loss0
    assert accs[0] > acc0 + 0.2  # already one round of aggregation moves the global model
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
    _, acc0 = untrained_accuracy(tmp_path, cfg['data_dir'])
    assert history['final_test_accuracy'] > 0.85 and history['final_test_accuracy'] > acc0 + 0.6


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
