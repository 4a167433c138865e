"""Membership inference: the game's statistics against brute force, and the attack on a model that memorised its
members (found) and on one that never saw a candidate (not found)."""
import argparse
import math

import numpy as np
import pytest
import torch

from src.attacks import membership as mia
from src.attacks import runner
from src.attacks.base import AttackerView, PrivateData
from src.client import client_update
from src.model import CNN


def test_roc_and_auc_match_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    member = rng.random(300) < 0.4
    fpr, tpr = mia.roc(scores, member)
    for t in np.unique(scores):
        # every threshold's (fpr, tpr) is a point of the curve
        point = ((scores >= t) & ~member).sum() / (~member).sum(), ((scores >= t) & member).sum() / member.sum()
        assert np.any(np.isclose(fpr, point[0]) & np.isclose(tpr, point[1]))
    pos, neg = scores[member], scores[~member]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert mia.auc(scores, member) == pytest.approx(brute)
    assert mia.tpr_at(fpr, tpr, 0.1) == max(t for f, t in zip(fpr, tpr) if f <= 0.1)


def test_clopper_pearson_known_values():
    lo, hi = mia.clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = mia.clopper_pearson(10, 10)
    assert hi == 1 and lo == pytest.approx(0.025 ** (1 / 10))


def test_empirical_epsilon():
    member = np.arange(2000) < 1000
    # TPR <= FPR at every threshold (members score lower): no evidence against any epsilon
    assert mia.empirical_epsilon(np.where(member, 0.0, 1.0), member, 1e-5, 0) == 0.0
    assert mia.empirical_epsilon(np.random.default_rng(1).random(2000), member, 1e-5, 0) < 0.3
    # perfect separation of ~500 + 500 test candidates: bounded by the sample (FPR's upper end ~ 0.0074)
    eps = mia.empirical_epsilon(member.astype(float), member, 1e-5, 0)
    test = member[np.random.default_rng(mia.derive_seed(0, 'epsilon-split')).permutation(2000) >= 1000]
    p, n = test.sum(), (~test).sum()
    tpr_lo, fpr_hi = 0.025 ** (1 / p), 1 - 0.025 ** (1 / n)  # Clopper-Pearson ends at k = p and k = 0
    expected = max(math.log((tpr_lo - 1e-5) / fpr_hi), math.log((1 - fpr_hi - 1e-5) / (1 - tpr_lo)))
    assert eps == pytest.approx(expected, rel=1e-6) and 4.5 < eps < 5.5


def noise_task(n, seed):
    """Images of pure noise with random labels: a model can only fit them by memorising each one."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def game_inputs(memorise, tmp_path, epochs=60):
    """A view whose final model memorised 2 clients' 60 noise images each and whose record holds client 0's update
    from the initial weights (memorise=True), or both trained on other noise."""
    train_x, train_y = noise_task(120, 0)
    public_x, public_y = noise_task(240, 1)
    cfg = {'num_rounds': epochs, 'local_epochs': 1, 'batch_size': 20, 'learning_rate': 0.05, 'dp_delta': 1e-5}
    torch.manual_seed(0)
    model, client = CNN(), CNN()
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    client.load_state_dict(sent)
    x, y = (train_x, train_y) if memorise else noise_task(120, 2)
    client_update(model, x, y, epochs, 20, 0.05, 'fp32', torch.Generator().manual_seed(0))  # the final model
    client_update(client, x[:60], y[:60], epochs, 20, 0.05, 'fp32', torch.Generator().manual_seed(1))  # client 0
    update = {k: v - sent[k] for k, v in client.state_dict().items()}
    captured = {'rounds': [{'round': 1, 'global_state': sent,
                            'updates': [{'client': 0, 'num_samples': 60, 'delta': update}]}]}
    view = AttackerView(model=model.eval(), training={'config': cfg, 'privacy': {}}, captured=captured,
                        public_x=public_x, public_y=public_y, dataset='noise', device=torch.device('cpu'),
                        cache_dir=str(tmp_path))
    private = PrivateData(train_x=train_x, train_y=train_y, client_indices=[np.arange(60), np.arange(60, 120)],
                          dataset=None)
    return view, private


def settings(**kw):
    return argparse.Namespace(seed=0, mia_candidates=100, mia_shadows=3, mia_rounds='first,last', **kw)


def test_finds_members_of_a_model_that_memorised_them(tmp_path):
    view, private = game_inputs(True, tmp_path)
    m = runner.run_attacks(view, private, settings(), str(tmp_path), ['membership'], log=lambda *a: None)[0]
    m = m['membership_inference']
    assert m['final_model']['lira']['auc'] > 0.8
    assert m['final_model']['loss_threshold']['auc'] > 0.8
    # client 0's update lowers its own images' loss and aligns with their gradients, not the non-members'
    assert m['client_update']['headline']['auc_per_client']['0'] > 0.9
    assert m['client_update']['rounds'][-1]['gradient_alignment']['auc_per_client']['0'] > 0.65
    assert m['final_model']['lira']['empirical_epsilon'] > 0.5
    assert (tmp_path / 'membership_inference.png').stat().st_size > 0


def test_finds_nothing_in_a_model_that_saw_no_candidate(tmp_path):
    view, private = game_inputs(False, tmp_path)
    m = runner.run_attacks(view, private, settings(), str(tmp_path), ['membership'], log=lambda *a: None)[0]
    m = m['membership_inference']
    # 100 + 100 candidates: the AUC of a test that knows nothing has std ~0.041; allow 3 of them
    for value in (m['final_model']['lira']['auc'], m['final_model']['loss_threshold']['auc'],
                  m['client_update']['headline']['auc']):
        assert abs(value - 0.5) < 0.125
    assert m['final_model']['lira']['empirical_epsilon'] < 0.5


def test_non_members_are_withheld_from_the_attacker(tmp_path, monkeypatch):
    view, private = game_inputs(True, tmp_path, epochs=2)
    seen = {}
    real_run = mia.MembershipInference.run

    def spy(self, v, s):
        seen['public'] = v.public_x
        seen['candidates'] = v.observed['x']
        return real_run(self, v, s)

    monkeypatch.setattr(mia.MembershipInference, 'run', spy)
    runner.run_attacks(view, private, settings(), str(tmp_path), ['membership'], log=lambda *a: None)
    public = {tuple(r.flatten()[:8].tolist()) for r in seen['public']}
    candidates = {tuple(r.flatten()[:8].tolist()) for r in seen['candidates']}
    assert len(seen['public']) == 240 - 100 and not public & candidates


def test_shadows_trained_as_one_computation_equal_one_by_one(monkeypatch):
    """The CUDA path for shadow models (all of them as one batched computation, src.batched_training) trains
    each exactly as client_update does: same subsets, shuffling and dropout masks. Forced on the CPU in fp32."""
    monkeypatch.setattr(mia, 'resolve_precision', lambda *a: 'fp32')
    g = torch.Generator().manual_seed(0)
    pool_x, pool_y = torch.rand(300, 1, 28, 28, generator=g), torch.randint(0, 10, (300,), generator=g)
    recipe = (2, 32, 0.05)  # passes, batch size (ragged last batches of 10 rows), learning rate
    one_by_one = mia.train_models(pool_x, pool_y, 3, 90, recipe, 7, torch.device('cpu'))
    batched = mia.train_models(pool_x, pool_y, 3, 90, recipe, 7, torch.device('cpu'), batched=True)
    start = CNN().state_dict()
    for s, b in zip(one_by_one, batched):
        for k in s:
            torch.testing.assert_close(b[k], s[k], rtol=0, atol=1e-6)
        assert (s['fc2.weight'] - start['fc2.weight']).abs().max() > 1e-2  # they trained: far above the tolerance
    assert (one_by_one[0]['fc2.weight'] - one_by_one[1]['fc2.weight']).abs().max() > 1e-2  # different shadows
