"""The malicious server (src/malicious.py), its read-out (src/attacks/malicious_server.py) and the client check."""
import argparse

import pytest
import torch

from src.client import client_update
from src.data import to_tensor
from src.federated import client_tensors, load_partitions, train, validate
from src.malicious import ImprintCNN, build_model, craft, craft_imprint, read_imprint, sent_to, verify_received
from src.model import CNN, param_shapes
from src.records import load_captured
from src.server import CuriousServer
from src.utils import UserError, derive_seed
from tests.conftest import make_idx_dir, tiny_config

BINS = 600


def eight_bit(n, seed):
    """Random 8-bit images in [0, 1] (N, 1, 28, 28), every pixel on the k/255 lattice."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g).float() / 255


def test_an_image_alone_in_its_bin_is_recovered_exactly_and_a_shared_bin_is_a_collision():
    """One SGD step (FedSGD) on three images: A alone in its bin, B and C in one bin. One group of four
    bins, so every image has exactly one bin."""
    public = eight_bit(400, 0)
    state, params = craft_imprint(CNN().state_dict(), public, bins=4, images=3, lr=0.1, batch_size=3)
    assert params['groups'] == 1
    w, lower = params['directions'][0].double(), params['lower']
    pool = eight_bit(200, 1)
    bins = torch.searchsorted(lower, pool.flatten(1).double() @ w, right=True) - 1
    brightest = pool.flatten(1).amax(1) == 1.0
    a = int(((bins == 0) & brightest).nonzero()[0])           # A in bin 0, B and C together in bin 2
    b, c = (bins == 2).nonzero()[:2].squeeze(1).tolist()
    x = pool[[a, b, c]]
    y = torch.tensor([0, 2, 4])                               # B and C: the same sign of g, so a true blend
    model = ImprintCNN(4)
    model.load_state_dict(state)
    new, _ = client_update(model, x, y, epochs=1, batch_size=3, lr=0.1, generator=torch.Generator().manual_seed(0))
    read = read_imprint({k: new[k] - state[k] for k in ('imprint.weight', 'imprint.bias')}, params)
    assert read['rows'].tolist() == [0, 2]                    # the two bins that held images moved, no other
    alone, shared = 0, 1
    assert read['claimed'][alone] and not read['claimed'][shared]
    # exact to fp32 precision before rounding to the 8-bit lattice, and bit-exact after
    assert (read['raw'][alone] - x[0]).abs().max() < 1e-5
    assert torch.equal(read['images'][alone], x[0])
    assert read['residual'][shared] > 0.2                     # the blend is far off the lattice


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A 2-round 'loki' run crafting round 2, and the same experiment's 1-round honest run (fp32)."""
    base = tmp_path_factory.mktemp('malicious')
    data = make_idx_dir(base / 'data', n_train=300, n_test=200)
    common = dict(precision='fp32', capture_rounds='all')
    honest = tiny_config(data, base / 'honest', num_rounds=1, **common)
    malicious = tiny_config(data, base / 'malicious', num_rounds=2, server='malicious', malicious_attack='loki',
                            malicious_rounds='2', malicious_bins=BINS, **common)
    train(honest, log=lambda *a: None)
    train(malicious, log=lambda *a: None)
    return base, malicious


def test_a_crafted_round_update_is_client_update_on_what_that_client_was_sent(runs):
    base, cfg = runs
    record = load_captured(str(base / 'malicious' / 'captured_updates.pt'), param_shapes(CNN()))
    rd = record['rounds'][-1]
    assert rd['round'] == 2 and rd['crafted']['attack'] == 'loki'
    data, parts, _, _ = load_partitions(cfg)
    for u, (x, y) in zip(rd['updates'], client_tensors(data, parts, torch.device('cpu'))):
        c = u['client']
        sent = sent_to(rd['global_state'], rd['crafted'], c)
        model = build_model(sent).to(memory_format=torch.channels_last)
        model.load_state_dict(sent)
        model.dropout.generator = torch.Generator().manual_seed(derive_seed(cfg['seed'], 'dropout', 2, c))
        state, n = client_update(model, x, y, cfg['local_epochs'], cfg['batch_size'], cfg['learning_rate'], 'fp32',
                                 torch.Generator().manual_seed(derive_seed(cfg['seed'], 'shuffle', 2, c)))
        assert n == u['num_samples']
        for k in state:
            assert torch.equal(state[k] - sent[k], u['delta'][k]), (c, k)
        # each client's update moved its own share of the bins only
        lo, hi = rd['crafted']['client_rows'][c]
        moved = (u['delta']['imprint.weight'] != 0).any(1).nonzero().squeeze(1)
        assert len(moved) and ((moved >= lo) & (moved < hi)).all()


def test_a_crafted_round_is_recorded_not_aggregated(runs):
    base, _ = runs
    honest = torch.load(base / 'honest' / 'global_model.pth', weights_only=True)
    after = torch.load(base / 'malicious' / 'global_model.pth', weights_only=True)
    assert all(torch.equal(honest[k], after[k]) for k in honest)   # round 2 left round 1's model as it was
    import json
    rounds = json.loads((base / 'malicious' / 'training_history.json').read_text())['rounds']
    assert rounds[1]['crafted'] and rounds[1]['aggregated'] is False and not rounds[0].get('crafted')
    assert rounds[1]['test_accuracy'] == rounds[0]['test_accuracy']


def attack_args(tmp_path):
    from src.attacks import runner
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return runner.parse_args(parser, ['--attacks', 'malicious', '--device', 'cpu', '--cache-dir', str(tmp_path)])


def run_attack(run_dir, tmp_path):
    from src.attacks.runner import get
    from src.attacks.target import load_attack_inputs
    attack = get('malicious')
    view, private = load_attack_inputs(str(run_dir / 'global_model.pth'), device='cpu')
    args = attack_args(tmp_path)
    report = attack.score(attack.run(view, args), private, None, view, args, str(tmp_path))
    return attack, report.metrics


def test_the_attack_reads_the_crafted_round_and_scores_it(runs, tmp_path):
    base, _ = runs
    attack, m = run_attack(base / 'malicious', tmp_path)
    assert m['crafted_rounds'] == [2] and 'skipped' not in m
    assert m['client_images'] == 300
    # synthetic digits differ mostly by noise, so fewer are alone in a bin than real digits (ideal ~0.2 here)
    assert 0.1 < m['ideal'] and 0.8 * m['ideal'] <= m['recovered_40db'] <= m['ideal'] + 0.05
    assert m['no_attack_baseline']['recovered_40db'] == 0.0
    assert all(p['claimed_below_40db'] == 0 for p in m['per_round_client'])  # nothing claimed that is not there
    assert (tmp_path / 'malicious_server.png').stat().st_size > 1000


def test_the_attack_skips_a_record_without_crafted_rounds(runs, tmp_path):
    base, _ = runs
    attack, m = run_attack(base / 'honest', tmp_path)
    assert 'no crafted round' in m['skipped'] and m['summary'] == m['skipped']
    assert all(value is not None for _, _, value in attack.headline_values(m))
    assert (tmp_path / 'malicious_server.png').exists()


def test_client_verify_refuses_every_crafted_model_and_accepts_honest_ones(runs):
    base, cfg = runs
    data, parts, _, _ = load_partitions(cfg)
    images = client_tensors(data, parts, torch.device('cpu'))[0][0]
    public = to_tensor(data.test_images)
    honest = [CNN().state_dict() for _ in range(3)]
    honest += [torch.load(base / run / 'global_model.pth', weights_only=True) for run in ('honest', 'malicious')]
    for state in honest:
        assert verify_received(state, images=images) == []
    for variant in ('imprint', 'loki', 'fc1'):
        _, sent, _ = craft(variant, honest[-1], public, BINS, [100, 100, 100], 0.01, 64, False)
        for state in sent:
            reasons = verify_received(state, images=images)
            assert reasons, variant
    # what catches which: the architecture the imprint block adds; fc1's traps only through the client's data
    _, sent, _ = craft('fc1', honest[-1], public, BINS, [100, 100, 100], 0.01, 64, False)
    assert verify_received(sent[0]) == [] and 'traps' in verify_received(sent[0], images=images)[0]
    _, sent, _ = craft('imprint', honest[-1], public, BINS, [100, 100, 100], 0.01, 64, False)
    assert 'not the agreed architecture' in verify_received(sent[0])[0]
    # the statistics alone, on the imprint model's own tensors: parallel rows and sorted thresholds
    block = {'fc1.weight': sent[0]['imprint.weight'], 'fc1.bias': sent[0]['imprint.bias']}
    reasons = ' '.join(verify_received(block, agreed={k: tuple(v.shape) for k, v in block.items()}))
    assert 'copies' in reasons and 'sorted' in reasons


def test_client_verify_in_training_refuses_the_crafted_round(tmp_path):
    data = make_idx_dir(tmp_path / 'data', n_train=300, n_test=100)
    cfg = tiny_config(data, tmp_path / 'run', num_rounds=2, server='malicious', malicious_rounds='1',
                      malicious_bins=BINS, client_verify=True, precision='fp32')
    history = train(cfg, log=lambda *a: None)
    assert sorted(history['rounds'][0]['refused_by_clients']) == ['0', '1', '2']
    assert 'refused_by_clients' not in history['rounds'][1]             # the honest round: no false alarm
    record = torch.load(tmp_path / 'run' / 'captured_updates.pt', weights_only=True)
    assert [rd['round'] for rd in record['rounds']] == [2]                # nothing came back from round 1


def test_secure_aggregation_keeps_the_weighted_mean_of_updates_relative_to_what_each_was_sent():
    sent = [{'w': torch.tensor([1.0, 2.0])}, {'w': torch.tensor([1.0, 5.0])}]
    states = [{'w': torch.tensor([3.0, 2.0])}, {'w': torch.tensor([1.0, 9.0])}]
    server = CuriousServer(set(), {'batch_size': 1}, secure_aggregation=True)
    server.record_crafted(4, sent[0], sent, {'attack': 'fc1'}, [0, 1], states, [1, 3])
    rd = server.record()['rounds'][0]
    assert rd['round'] == 4 and 'updates' not in rd
    assert torch.equal(rd['aggregate']['delta']['w'], torch.tensor([0.5, 3.0]))  # (1*[2,0] + 3*[0,4]) / 4


@pytest.mark.parametrize('override, flag', [
    ({'server': 'evil'}, '--server'),
    ({'server': 'malicious', 'malicious_attack': 'breaching'}, '--malicious-attack'),
    ({'server': 'malicious', 'malicious_rounds': '9'}, '--malicious-rounds'),
    ({'server': 'malicious', 'malicious_rounds': 'none'}, '--malicious-rounds'),
    ({'server': 'malicious', 'malicious_bins': 1}, '--malicious-bins'),
    ({'server': 'malicious', 'engine': 'flower'}, '--engine'),
    ({'client_verify': True, 'engine': 'flower'}, '--engine'),
])
def test_impossible_malicious_settings_are_refused_with_the_flag(tmp_path, override, flag):
    cfg = tiny_config(str(tmp_path), tmp_path / 'out', **override)
    with pytest.raises(UserError, match=flag):
        validate(cfg)


def test_a_loki_update_is_stored_row_sparse_and_read_back_dense(runs):
    """Each 'loki' client moves 1/clients of the block's rows: the record keeps those rows only."""
    base, _ = runs
    raw = torch.load(base / 'malicious' / 'captured_updates.pt', weights_only=True)['rounds'][-1]
    checked = load_captured(str(base / 'malicious' / 'captured_updates.pt'), param_shapes(CNN()))['rounds'][-1]
    for u, v in zip(raw['updates'], checked['updates']):
        stored, dense = u['delta']['imprint.weight'], v['delta']['imprint.weight']
        lo, hi = raw['crafted']['client_rows'][u['client']]
        assert stored.layout == torch.sparse_coo and stored._values().shape[0] <= hi - lo
        assert dense.layout == torch.strided and torch.equal(stored.to_dense(), dense)
        assert u['delta']['conv1.weight'].layout == torch.strided  # the CNN's own tensors stay dense
