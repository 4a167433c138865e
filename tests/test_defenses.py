import json
import math

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from src.defenses import clip_and_noise, dp_client_update, epsilon, prune, update_epsilon
from src.federated import train
from src.data import MNIST_SPEC
from src.model import CNN
from src.utils import UserError
from tests.conftest import make_idx_dir, tiny_config

QUIET = lambda *a: None  # noqa: E731


def flat_norm(tensors):
    return torch.sqrt(sum((t ** 2).sum() for t in tensors)).item()


def test_opacus_clips_per_sample_gradients():
    """With zero noise, a DP step's gradient is the mean of per-sample gradients clipped to C,
    so its norm is at most C even when every raw per-sample gradient is far larger."""
    torch.manual_seed(0)
    model = CNN()
    x, y = torch.rand(8, 1, 28, 28) * 50, torch.randint(0, 10, (8,))  # huge inputs -> huge gradients
    raw = torch.autograd.grad(F.cross_entropy(model(x[:1]), y[:1]), list(model.parameters()))
    assert flat_norm(raw) > 100
    engine = PrivacyEngine(accountant='rdp')
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    private, opt, _ = engine.make_private(module=model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=0.5,
                                          data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
                                          poisson_sampling=False)
    loss = F.cross_entropy(private(x), y)
    opt.zero_grad()
    loss.backward()
    per_sample = torch.cat([p.grad_sample.reshape(8, -1) for p in private.parameters()], 1)
    assert (per_sample.norm(dim=1) > 1.0).all()  # every sample is above twice the bound C = 0.5
    assert per_sample.mean(0).norm() > 50  # unclipped, the step would be 100x longer
    opt.step()
    grads = [p.grad for p in private.parameters()]
    assert flat_norm(grads) <= 0.5 + 1e-5


@pytest.mark.parametrize('mode', ['ghost', 'hooks'])
def test_dp_client_update_is_clipped_per_sample_sgd(mode):
    """Zero noise, one full batch (Poisson sampling at rate 1 takes every image): the step is exactly
    -lr * mean over samples of each gradient clipped to C, computed here one sample at a time, with ghost
    clipping (the default) and with Opacus's per-example gradients."""
    torch.manual_seed(0)
    x, y = torch.rand(5, 1, 28, 28) * 5, torch.randint(0, 10, (5,))
    start = {k: v.clone() for k, v in CNN(dropout=0.0).state_dict().items()}
    lr, clip = 0.1, 0.5

    def run(noise, seed=0):
        model = CNN(dropout=0.0)
        model.load_state_dict(start)
        return dp_client_update(model, x, y, 1, 5, lr, noise, clip, [], torch.Generator().manual_seed(seed), mode)

    state, n, history = run(0.0)
    assert n == 5 and set(state) == set(start)
    assert [tuple(h) for h in history] == [(0.0, 1.0, 1)]  # (noise multiplier, sample rate, steps)
    ref = CNN(dropout=0.0)
    ref.load_state_dict(start)
    names = [k for k, _ in ref.named_parameters()]
    total = {k: torch.zeros_like(v) for k, v in start.items()}
    for i in range(5):
        g = torch.autograd.grad(F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]), list(ref.parameters()))
        norm = flat_norm(g)
        assert norm > 10 * clip  # every sample is clipped, by a large factor
        for k, t in zip(names, g):
            total[k] += t * (clip / norm)
    for k in start:
        torch.testing.assert_close(state[k], start[k] - lr * total[k] / 5, rtol=0, atol=1e-7)
    assert 0 < flat_norm([state[k] - start[k] for k in start]) <= lr * clip + 1e-6

    # noise: seeded (the same generator seed gives the same state), of std lr * sigma * C / batch per coordinate
    noisy, _, noisy_history = run(2.0, seed=1)
    assert [tuple(h) for h in noisy_history] == [(2.0, 1.0, 1)]
    again, _, _ = run(2.0, seed=1)
    other, _, _ = run(2.0, seed=2)
    assert all(torch.equal(noisy[k], again[k]) for k in start)
    assert not torch.equal(noisy['fc1.weight'], other['fc1.weight'])
    diff = noisy['fc1.weight'] - state['fc1.weight']  # 204,800 draws
    assert abs(diff.std().item() / (lr * 2.0 * clip / 5) - 1) < 0.02 and abs(diff.mean().item()) < 1e-4


def opacus_epsilon(steps, delta):
    """Epsilon from Opacus's own accountant, stepped one SGD step at a time."""
    accountant = RDPAccountant()
    for noise, rate, n in steps:
        for _ in range(n):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta)


def test_epsilon_is_opacus_accountant_and_monotone():
    assert epsilon([], 1e-5) == 0.0
    # (subsampled histories cost ~0.1 s each to account; full-batch ones are closed-form)
    for history in ([(1.0, 0.5, 3), (2.0, 0.1, 20)], [[0.7, 1.0, 2]]):
        assert epsilon(history, 1e-5) == pytest.approx(opacus_epsilon(history, 1e-5), rel=1e-12)
    by_noise = [epsilon([(sigma, 1.0, 10)], 1e-5) for sigma in (0.6, 1.0, 2.0, 4.0)]
    assert all(a > b > 0 for a, b in zip(by_noise, by_noise[1:]))  # more noise, less privacy spent
    by_steps = [epsilon([(1.0, 1.0, steps)], 1e-5) for steps in (1, 2, 10, 50)]
    assert all(0 < a < b for a, b in zip(by_steps, by_steps[1:]))
    by_delta = [epsilon([(1.0, 1.0, 10)], delta) for delta in (1e-7, 1e-5, 1e-3)]
    assert all(a > b for a, b in zip(by_delta, by_delta[1:]))
    # update clipping + noise: one full-participation Gaussian release per round
    assert update_epsilon(3, 0.8, 1e-5) == pytest.approx(opacus_epsilon([(0.8, 1.0, 3)], 1e-5), rel=1e-12)
    assert update_epsilon(3, 0.8, 1e-5) < update_epsilon(4, 0.8, 1e-5)
    assert update_epsilon(3, 1.6, 1e-5) < update_epsilon(3, 0.8, 1e-5)
    assert update_epsilon(3, 0.0, 1e-5) == math.inf


def test_epsilon_grows_with_steps():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    history = []
    eps = []
    for _ in range(2):
        _, _, history = dp_client_update(CNN(), x, y, 1, 16, 0.1, 1.0, 1.0, history, torch.Generator().manual_seed(0))
        eps.append(epsilon(history, 1e-5))
        # 64 images in batches of 16: Poisson rate 1/4, 4 steps per epoch, accumulated across calls
        assert [tuple(h) for h in history] == [(1.0, 0.25, 4 * len(eps))]
    assert 0 < eps[0] < eps[1]  # (epsilon of a history is checked against Opacus's accountant above)


@pytest.mark.parametrize('fraction', [0.1, 0.5, 0.01])
def test_pruning_keeps_exactly_the_fraction(fraction):
    torch.manual_seed(0)
    delta = {k: torch.randn_like(v) for k, v in CNN().state_dict().items()}
    original = {k: v.clone() for k, v in delta.items()}
    pruned = prune(delta, fraction)
    assert set(pruned) == set(delta)
    for k, v in pruned.items():
        assert v.shape == delta[k].shape and v.dtype == delta[k].dtype
        assert torch.equal(delta[k], original[k])  # the input is left alone
        keep = max(1, round(fraction * v.numel()))
        assert (v != 0).sum().item() == keep
        # exactly the top-k entries by magnitude, with their values unchanged
        top = delta[k].reshape(-1).abs().topk(keep).indices
        expected = torch.zeros(v.numel())
        expected[top] = delta[k].reshape(-1)[top]
        assert torch.equal(v, expected.reshape(v.shape))


def test_pruning_hand_cases():
    delta = {'a': torch.tensor([0.1, -5.0, 3.0, 0.2]), 'b': torch.tensor([[1.0, -2.0], [0.5, 4.0]]),
             'c': torch.tensor([0.3])}
    pruned = prune(delta, 0.5)
    assert torch.equal(pruned['a'], torch.tensor([0.0, -5.0, 3.0, 0.0]))  # sign kept, by magnitude
    assert torch.equal(pruned['b'], torch.tensor([[0.0, -2.0], [0.0, 4.0]]))  # per tensor, not global
    assert torch.equal(pruned['c'], torch.tensor([0.3]))  # at least one entry survives
    assert torch.equal(prune(delta, 0.25)['a'], torch.tensor([0.0, -5.0, 0.0, 0.0]))
    assert torch.equal(prune(delta, 0.75)['a'], torch.tensor([0.0, -5.0, 3.0, 0.2]))
    assert all(torch.equal(prune(delta, 1.0)[k], delta[k]) for k in delta)


def test_update_clipping_bounds_the_norm():
    delta = {'a': torch.full((10,), 3.0), 'b': torch.full((5,), -4.0)}  # norm sqrt(90 + 80) = sqrt(170)
    clipped = clip_and_noise(delta, clip=1.0, noise_multiplier=0.0, generator=torch.Generator())
    assert abs(flat_norm(clipped.values()) - 1.0) < 1e-5
    scale = 1.0 / math.sqrt(170)  # the same direction, scaled to exactly the bound
    torch.testing.assert_close(clipped['a'], torch.full((10,), 3.0 * scale), rtol=1e-6, atol=0)
    torch.testing.assert_close(clipped['b'], torch.full((5,), -4.0 * scale), rtol=1e-6, atol=0)
    assert torch.equal(delta['a'], torch.full((10,), 3.0))  # the input is left alone
    # an update already inside the bound is sent unchanged
    small = clip_and_noise(delta, clip=20.0, noise_multiplier=0.0, generator=torch.Generator())
    assert all(torch.equal(small[k], delta[k]) for k in delta)
    bigger = clip_and_noise(delta, clip=2.5, noise_multiplier=0.0, generator=torch.Generator())
    assert abs(flat_norm(bigger.values()) - 2.5) < 1e-5


def test_update_noise_has_the_announced_std_and_is_seeded():
    zero = {'a': torch.zeros(300, 300), 'b': torch.zeros(300, 300)}  # nothing to clip: the output is the noise
    out = clip_and_noise(zero, clip=2.0, noise_multiplier=0.5, generator=torch.Generator().manual_seed(0))
    for v in out.values():
        assert abs(v.std().item() - 1.0) < 0.01 and abs(v.mean().item()) < 0.01  # std = 0.5 * 2.0
    assert abs(torch.corrcoef(torch.stack([out['a'].flatten(), out['b'].flatten()]))[0, 1].item()) < 0.02
    same = clip_and_noise(zero, clip=2.0, noise_multiplier=0.5, generator=torch.Generator().manual_seed(0))
    other = clip_and_noise(zero, clip=2.0, noise_multiplier=0.5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(out[k], same[k]) for k in out) and not torch.equal(out['a'], other['a'])
    # noise is added after clipping: a huge update clipped to C = 2 plus N(0, 1) noise
    huge = {'a': torch.full((300, 300), 1e3), 'b': torch.zeros(300, 300)}
    noisy = clip_and_noise(huge, clip=2.0, noise_multiplier=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy['a'] - out['a'], torch.full((300, 300), 2.0 / 300), rtol=0, atol=1e-5)


def test_secure_aggregation_keeps_no_individual_update(idx_dir, tmp_path):
    train(tiny_config(idx_dir, tmp_path, num_rounds=1, secure_aggregation=True), log=QUIET)
    record = torch.load(tmp_path / 'captured_updates.pt', weights_only=True)
    rnd = record['rounds'][0]
    assert 'updates' not in rnd and rnd['aggregate']['num_clients'] == 3
    assert rnd['aggregate']['num_samples'] == 300 and set(rnd['aggregate']) == {'num_clients', 'num_samples', 'delta'}
    assert record['meta']['secure_aggregation'] is True
    assert all(set(r) == {'round', 'global_state', 'aggregate'} for r in record['rounds'])
    final = torch.load(tmp_path / 'global_model.pth', weights_only=True)
    for k in final:  # what it keeps is exactly the aggregate step, nothing finer
        torch.testing.assert_close(rnd['global_state'][k] + rnd['aggregate']['delta'][k], final[k], rtol=0, atol=1e-6)
    assert any(rnd['aggregate']['delta'][k].abs().max() > 1e-4 for k in final)  # the round did move the model


def test_training_with_composed_defenses_reports_privacy(idx_dir, tmp_path):
    cfg = tiny_config(idx_dir, tmp_path, num_rounds=2, dp_noise_multiplier=1.0, update_clip=5.0,
                      update_noise=0.1, keep_fraction=0.5, dp_local_epochs=1, dp_batch_size=64)
    history = train(cfg, log=QUIET)
    assert history['defenses'] == ['dp_sgd', 'update_clip_noise', 'pruning']
    dp = history['privacy']['dp_sgd']
    assert len(dp['epsilon_per_client']) == 3 and dp['epsilon'] == max(dp['epsilon_per_client']) > 0
    # each client: 100 images in batches of 64 -> Poisson rate 1/2, 2 steps an epoch, 1 epoch x 2 rounds
    assert [c['num_samples'] for c in history['clients']] == [100, 100, 100]
    expected = opacus_epsilon([(1.0, 0.5, 4)], 1e-5)
    assert all(eps == pytest.approx(expected, rel=1e-12) for eps in dp['epsilon_per_client'])
    assert history['privacy']['update_clip_noise']['epsilon'] == pytest.approx(
        opacus_epsilon([(0.1, 1.0, 2)], 1e-5), rel=1e-12)
    record = torch.load(tmp_path / 'captured_updates.pt', weights_only=True)
    for rnd in record['rounds']:  # what the server received was pruned to half of every tensor
        for u in rnd['updates']:
            assert all((d != 0).sum().item() == round(0.5 * d.numel()) for d in u['delta'].values())


def test_sweep_resumes_and_writes_its_outputs(idx_dir, tmp_path):
    import json

    import run_defense_sweep
    from src.defense_sweep import sweep

    args = run_defense_sweep.parse_args(['--attacks', 'model', '--mi-steps', '3', '--mi-restarts', '1',
                                         '--device', 'cpu', '--cache-dir', str(tmp_path / 'cache')])
    base = tiny_config(idx_dir, tmp_path / 'unused', num_rounds=1)
    grid = [('pruning', 'keep_fraction', [0.5])]
    out = tmp_path / 'sweep'
    logs = []
    first = sweep(base, args, grid, ['model'], str(out), log=logs.append)
    assert [p['point'] for p in first['points']] == ['none', 'pruning-keep_fraction=0.5']
    assert (out / 'defense_tradeoff.png').exists() and json.loads((out / 'defense_sweep.json').read_text())
    logs.clear()
    again = sweep(base, args, grid, ['model'], str(out), log=logs.append)  # an interrupted sweep's rerun
    assert sum('done earlier, reusing' in line for line in logs) == 2  # nothing was trained again
    assert [p['test_accuracy'] for p in again['points']] == [p['test_accuracy'] for p in first['points']]


@pytest.mark.parametrize('target', [0.5, 3.0, 8.0])
@pytest.mark.parametrize('sizes,batch,epochs,rounds', [([1600] * 5, 64, 1, 10), ([100, 250, 37], 32, 3, 4)])
def test_noise_for_epsilon_round_trips_through_the_accountant(target, sizes, batch, epochs, rounds):
    from src.defenses import noise_for_epsilon
    sigma = noise_for_epsilon(target, 1e-5, sizes, batch, epochs, rounds)
    spent = []
    for n in sizes:
        steps = math.ceil(n / batch)
        spent.append(opacus_epsilon([(sigma, 1 / steps, steps * epochs * rounds)], 1e-5))
    assert max(spent) <= target and max(spent) > 0.97 * target  # at most the target, and not far below it


def test_training_at_a_target_epsilon_spends_at_most_it(idx_dir, tmp_path):
    cfg = tiny_config(idx_dir, tmp_path, num_rounds=2, dp_epsilon=2.0, dp_local_epochs=2, dp_batch_size=32,
                      dp_learning_rate=0.3)
    history = train(cfg, log=QUIET)
    dp = history['privacy']['dp_sgd']
    assert history['defenses'] == ['dp_sgd'] and 1.9 < dp['epsilon'] <= 2.0
    assert history['config']['dp_noise_multiplier'] == dp['noise_multiplier'] > 0
    record = torch.load(tmp_path / 'captured_updates.pt', weights_only=True)
    assert (record['meta']['learning_rate'], record['meta']['batch_size'], record['meta']['local_epochs']) == (0.3, 32, 2)


def test_target_epsilon_and_noise_multiplier_are_not_both_given(idx_dir, tmp_path):
    with pytest.raises(UserError, match='not both'):
        train(tiny_config(idx_dir, tmp_path, dp_epsilon=3.0, dp_noise_multiplier=1.0), log=QUIET)


def test_sweep_reads_a_crafted_round_after_training_and_defenses_blunt_it(tmp_path):
    """With the malicious attack the sweep adds one crafted round after the honest ones: each point's
    clients train it under that point's defense, the global model stays the honest rounds' one."""
    import run_defense_sweep
    from src.defense_sweep import sweep

    data = make_idx_dir(tmp_path / 'data', n_train=300, n_test=200)
    args = run_defense_sweep.parse_args(['--attacks', 'malicious', '--device', 'cpu',
                                         '--cache-dir', str(tmp_path / 'cache')])
    base = tiny_config(data, tmp_path / 'unused', num_rounds=1, precision='fp32', malicious_bins=600)
    grid = [('dp_sgd', 'dp_noise_multiplier', [1.0])]
    result = sweep(base, args, grid, ['malicious'], str(tmp_path / 'sweep'), log=QUIET)
    none, dp = result['points']
    assert none['config']['num_rounds'] == 2 and none['config']['malicious_rounds'] == '2'
    history = json.loads((tmp_path / 'sweep' / 'defense_sweep' / 'none' / 'training_history.json').read_text())
    assert [r.get('crafted', False) for r in history['rounds']] == [False, True]
    assert none['test_accuracy'] == history['rounds'][0]['test_accuracy']  # the crafted round changed nothing
    assert none['malicious_server.recovered_40db'] > 0.1                    # undefended: images read out
    assert dp['malicious_server.recovered_40db'] == 0.0                     # per-example clipping + noise: none


@pytest.mark.parametrize('dropout', [0.0, 0.5])
def test_a_dp_client_trains_with_the_dp_dropout(idx_dir, tmp_path, dropout):
    """local_update under DP-SGD is dp_client_update on the model with dp_dropout, and depends on the seeds
    alone (Opacus samples its batches from the global RNG, which the two calls leave in different states)."""
    from src.federated import client_tensors, init_model, load_partitions, local_update
    from src.utils import derive_seed
    cfg = tiny_config(idx_dir, tmp_path, dp_noise_multiplier=1.0, dp_batch_size=32, dp_dropout=dropout)
    data, parts, _, _ = load_partitions(cfg)
    x, y = client_tensors(data, parts, torch.device('cpu'))[0]
    model, state = init_model(cfg, MNIST_SPEC, torch.device('cpu'))
    got, _, _ = local_update(cfg, model, state, x, y, 1, 0, 'fp32', [])
    expected_model = CNN(dropout=dropout)
    expected_model.load_state_dict(state)
    expected_model.dropout.generator = torch.Generator().manual_seed(derive_seed(cfg['seed'], 'dropout', 1, 0))
    expected, _, _ = dp_client_update(expected_model, x, y, cfg['dp_local_epochs'], 32, cfg['dp_learning_rate'], 1.0,
                                      cfg['dp_max_grad_norm'], [],
                                      torch.Generator().manual_seed(derive_seed(cfg['seed'], 'shuffle', 1, 0)))
    assert all(torch.equal(got[k], expected[k]) for k in got)
