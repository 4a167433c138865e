import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from src.defenses import clip_and_noise, dp_client_update, epsilon, prune
from src.federated import train
from src.model import CNN
from tests.conftest import tiny_config

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


def test_epsilon_grows_with_steps():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    history = []
    eps = []
    for _ in range(2):
        _, _, history = dp_client_update(CNN(), x, y, 1, 16, 0.1, 1.0, 1.0, history, torch.Generator().manual_seed(0))
        eps.append(epsilon(history, 1e-5))
    assert 0 < eps[0] < eps[1]


@pytest.mark.parametrize('fraction', [0.1, 0.5, 0.01])
def test_pruning_keeps_exactly_the_fraction(fraction):
    torch.manual_seed(0)
    delta = {k: torch.randn_like(v) for k, v in CNN().state_dict().items()}
    pruned = prune(delta, fraction)
    for k, v in pruned.items():
        keep = max(1, round(fraction * v.numel()))
        assert (v != 0).sum().item() == keep
        kept = v[v != 0].abs()
        dropped = delta[k][v == 0].abs()
        assert dropped.numel() == 0 or kept.min() >= dropped.max()  # the largest ones are kept


def test_update_clipping_bounds_the_norm():
    delta = {'a': torch.full((10,), 3.0), 'b': torch.full((5,), -4.0)}
    clipped = clip_and_noise(delta, clip=1.0, noise_multiplier=0.0, generator=torch.Generator())
    assert abs(flat_norm(clipped.values()) - 1.0) < 1e-5


def test_secure_aggregation_keeps_no_individual_update(idx_dir, tmp_path):
    train(tiny_config(idx_dir, tmp_path, num_rounds=1, secure_aggregation=True), log=QUIET)
    record = torch.load(tmp_path / 'captured_updates.pt', weights_only=True)
    rnd = record['rounds'][0]
    assert 'updates' not in rnd and rnd['aggregate']['num_clients'] == 3
    final = torch.load(tmp_path / 'global_model.pth', weights_only=True)
    for k in final:  # what it keeps is exactly the aggregate step, nothing finer
        torch.testing.assert_close(rnd['global_state'][k] + rnd['aggregate']['delta'][k], final[k])


def test_training_with_composed_defenses_reports_privacy(idx_dir, tmp_path):
    cfg = tiny_config(idx_dir, tmp_path, num_rounds=2, dp_noise_multiplier=1.0, update_clip=5.0,
                      update_noise=0.1, keep_fraction=0.5)
    history = train(cfg, log=QUIET)
    assert history['defenses'] == ['dp_sgd', 'update_clip_noise', 'pruning']
    dp = history['privacy']['dp_sgd']
    assert len(dp['epsilon_per_client']) == 3 and dp['epsilon'] == max(dp['epsilon_per_client']) > 0
    assert history['privacy']['update_clip_noise']['epsilon'] > 0


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
