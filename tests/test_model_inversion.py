import argparse
import copy
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src import evaluation as ev
from src.attacks import common, runner
from src.attacks import model_inversion as mi
from src.attacks.base import AttackerView, PrivateData
from src.client import client_update
from src.data import Dataset, to_tensor
from src.model import CNN
from src.utils import UserError
from tests.conftest import synthetic_digits


@pytest.fixture(scope='module')
def tiny():
    """(view, private): a CNN trained for a few seconds on learnable synthetic digits; the server's view
    built directly from its fields (no files), the clients' data apart."""
    tr_x, tr_y = synthetic_digits(300, 0)
    te_x, te_y = synthetic_digits(100, 1)
    data = Dataset('mnist', tr_x, tr_y, te_x, te_y)
    x, y = to_tensor(tr_x), torch.from_numpy(tr_y.astype(np.int64))
    torch.manual_seed(0)
    model = CNN()
    state, _ = client_update(model, x, y, epochs=3, batch_size=32, lr=0.05,
                             generator=torch.Generator().manual_seed(0))
    model.load_state_dict(state)
    model.eval()
    view = AttackerView(model=model, training={'config': {}}, captured=None, public_x=to_tensor(te_x),
                        public_y=torch.from_numpy(te_y.astype(np.int64)), dataset='mnist',
                        device=torch.device('cpu'))
    private = PrivateData(train_x=x, train_y=y, client_indices=[np.arange(0, 150), np.arange(150, 300)],
                          dataset=data)
    return view, private


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    """One evaluator cache for the module: both evaluators train once (then memoised)."""
    return str(tmp_path_factory.mktemp('mi_cache'))


def parse(argv=()):
    p = argparse.ArgumentParser()
    mi.ModelInversion().add_arguments(p)
    args = p.parse_args(list(argv))
    args.seed, args.device = 0, 'cpu'
    return args


def confidence(model, x, classes):
    with torch.no_grad():
        return model(x).softmax(1).gather(1, classes[:, None]).squeeze(1)


@pytest.mark.parametrize('loss', ['logit', 'ce'])
def test_inversion_raises_the_target_class_confidence_far_above_its_start(tiny, loss):
    model = tiny[0].model
    x0, classes = mi.start_images(10, 2, 'noise', 0, 'cpu')
    before = confidence(model, x0, classes)
    images, log_prob = mi.invert(model, x0, classes, steps=40, lr=0.1, loss=loss)
    after = confidence(model, images, classes)
    assert before.mean() < 0.5
    assert after.mean() > 0.85 and (after - before).min() > 0.3, (before, after)
    torch.testing.assert_close(log_prob.exp(), after, atol=1e-5, rtol=1e-4)
    assert images.min() >= 0 and images.max() <= 1  # stays a valid image
    assert not model.training and all(p.requires_grad for p in model.parameters())  # model left as found


def test_batched_inversion_matches_one_image_at_a_time(tiny):
    """Classes and restarts in one batch must give each image exactly its own optimisation."""
    model = tiny[0].model
    x0, classes = mi.start_images(3, 2, 'noise', 5, 'cpu')
    batched, _ = mi.invert(model, x0, classes, steps=10, lr=0.1, seed=5)
    for i in range(len(x0)):
        single, _ = mi.invert(model, x0[i:i + 1], classes[i:i + 1], steps=10, lr=0.1, seed=5)
        torch.testing.assert_close(single[0], batched[i], atol=1e-4, rtol=1e-4)


def test_run_completes_from_a_view_built_directly_with_no_private_field(tiny):
    view, _ = tiny
    fields = {f.name for f in dataclasses.fields(AttackerView)}
    assert not fields & {'train_x', 'train_y', 'client_indices', 'data', 'private'}
    result = mi.ModelInversion().run(view, parse(['--mi-steps', '15', '--mi-restarts', '2']))
    assert result['images'].shape == (10, 2, 1, 28, 28) and result['log_prob'].shape == (10, 2)
    assert 0 <= result['images'].min() and result['images'].max() <= 1
    # the best restart is the one the TARGET model was surest of
    torch.testing.assert_close(result['log_prob'][torch.arange(10), result['best']], result['log_prob'].max(1).values)
    assert result['settings']['variant'] == 'default' and result['attack_seconds'] > 0


class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def test_published_variant_runs_bare_cross_entropy_without_tv_l2_or_jitter(tiny, monkeypatch):
    view = tiny[0]
    steps = 12
    argv = ['--mi-steps', str(steps), '--mi-restarts', '1', '--mi-precision', 'fp32']
    tv, roll = CallCounter(common.total_variation), CallCounter(torch.roll)
    monkeypatch.setattr(common, 'total_variation', tv)
    monkeypatch.setattr(torch, 'roll', roll)

    # the flags the published variant overrides are set to something else on purpose
    published = mi.ModelInversion().run(view, parse(argv + ['--mi-variant', 'published', '--mi-loss', 'logit',
                                                            '--mi-tv', '3', '--mi-l2', '4', '--mi-jitter', '2']))
    s = published['settings']
    assert (s['variant'], s['loss'], s['tv_weight'], s['l2_weight'], s['jitter']) == ('published', 'ce', 0, 0, 0)
    assert tv.calls == 0 and roll.calls == 0  # no total variation computed, no shift made

    # behaviour: exactly projected Adam on the bare cross-entropy, written out here independently (in the
    # attack's memory layout: Adam turns rounding-sized gradient differences into visible pixel ones)
    x0, classes = mi.start_images(10, 1, 'noise', 0, 'cpu')
    model = copy.deepcopy(view.model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    x = x0.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), classes, reduction='none').sum().backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    torch.testing.assert_close(published['images'].view(10, 1, 28, 28), x.detach(), atol=1e-4, rtol=0)

    # the default variant does use them (the spies see it), and lands elsewhere
    default = mi.ModelInversion().run(view, parse(argv))
    assert tv.calls == steps and roll.calls == steps
    assert (default['images'].view(10, 1, 28, 28) - x.detach()).abs().max() > 0.1


def test_score_reports_attack_baselines_and_both_evaluators(tiny, cache_dir, tmp_path):
    view, private = tiny
    view = dataclasses.replace(view, cache_dir=cache_dir)
    args = parse(['--mi-steps', '30', '--mi-restarts', '3'])
    attack = mi.ModelInversion()
    metrics, arrays = runner.run_attacks(view, private, args, str(tmp_path), ['model'], log=lambda *a: None)
    m = metrics['model_inversion']
    arrays = {k.split('/', 1)[1]: v for k, v in arrays.items()}
    assert os.path.isfile(tmp_path / 'model_inversion_all.png')
    json.dumps(m, allow_nan=False)  # strict JSON
    assert {'overall', 'per_class', 'eval_classifier', 'settings', 'threat_model', 'summary', 'seed', 'n_failed',
            'attack_seconds', 'seconds', 'evaluators', 'no_attack_baseline', 'class_disjoint'} <= set(m)
    assert set(m['overall']) == {'best_restart', 'all_restarts'}

    # every declared headline number is there, and every fraction is one
    for label, kind, value in attack.headline_values(m):
        assert value is not None, label
        if kind == 'fraction':
            assert 0 <= value <= 1, label
    for summary in (m['overall']['best_restart'], m['overall']['all_restarts'], m['no_attack_baseline'],
                    m['class_disjoint']['best_restart'], m['class_disjoint']['all_restarts'],
                    m['class_disjoint']['no_attack_baseline']):
        for k in ('attack_accuracy', 'attack_accuracy_primary', 'attack_accuracy_second', 'eval_confidence',
                  'target_confidence'):
            assert 0 <= summary[k] <= 1, k
        assert summary['knn_feature_distance'] >= 0 and summary['knn_pixel_distance'] > 0
    assert m['overall']['best_restart']['count'] == 10 and m['overall']['all_restarts']['count'] == 30
    assert m['no_attack_baseline']['count'] == 10
    cd = m['class_disjoint']
    assert cd['attacked_classes'] == [0, 1, 2, 3, 4] and cd['public_classes'] == [5, 6, 7, 8, 9]
    assert cd['best_restart']['count'] == 5 and cd['all_restarts']['count'] == 15
    assert cd['no_attack_baseline']['count'] == 5 and 'protocol' in cd

    # the two evaluators: info of both, and the headline counts an image only where both read its class
    assert set(m['evaluators']) == {'primary', 'second'}
    assert m['evaluators']['second']['arch'] == 'pixel-mlp-v1' and 0 <= m['evaluators']['second']['test_accuracy'] <= 1
    assert m['eval_classifier']['test_accuracy'] == m['evaluators']['primary']['test_accuracy']
    target = np.arange(10)[:, None]
    both = (arrays['eval_predictions_all'] == target) & (arrays['second_predictions_all'] == target)
    assert m['overall']['all_restarts']['attack_accuracy'] == pytest.approx(both.mean())
    assert m['overall']['all_restarts']['attack_accuracy_primary'] == pytest.approx(
        (arrays['eval_predictions_all'] == target).mean())
    assert m['class_disjoint']['all_restarts']['attack_accuracy'] == pytest.approx(both[:5].mean())
    assert m['per_class']['3']['all_restarts']['attack_accuracy'] == pytest.approx(both[3].mean())
    # the best restart is the one the TARGET model was surest of
    conf = arrays['target_confidence_all']
    for c in range(10):
        b = m['per_class'][str(c)]['best_restart_index']
        assert conf[c, b] == conf[c].max()
        np.testing.assert_array_equal(arrays['best_images'][c], arrays['all_restarts'][c, b])

    # the baselines, recomputed here from their definitions and scored the same way
    evaluators = ev.load_evaluators(private.dataset, 0, cache_dir, 'cpu')
    px, py = private.clients()
    means = torch.stack([view.public_x[view.public_y == c].mean(0) for c in range(10)])
    np.testing.assert_allclose(arrays['baseline_images'], means.squeeze(1).numpy(), atol=1e-6)
    expected = ev.score_inversions(evaluators, means, torch.arange(10), px, py)['overall']
    for k in ('attack_accuracy', 'eval_confidence', 'knn_feature_distance', 'knn_pixel_distance'):
        assert m['no_attack_baseline'][k] == pytest.approx(expected[k]), k
    mean_5_9 = view.public_x[view.public_y >= 5].mean(0, keepdim=True).expand(5, -1, -1, -1)
    expected = ev.score_inversions(evaluators, mean_5_9, torch.arange(5), px, py)['overall']
    for k in ('attack_accuracy', 'knn_feature_distance', 'knn_pixel_distance'):
        assert cd['no_attack_baseline'][k] == pytest.approx(expected[k]), k
    assert 'no attack' in m['summary'] and 'classes 0-4' in m['summary']

    # the evaluators were cached and are reused; same seed, same result
    again, arrays2 = runner.run_attacks(view, private, args, str(tmp_path), ['model'], log=lambda *a: None)
    assert all(i['from_cache'] for i in again['model_inversion']['evaluators'].values())
    np.testing.assert_array_equal(arrays['all_restarts'], arrays2['model_inversion/all_restarts'])


def test_published_variant_recorded_and_a_public_set_without_5_to_9(tiny, cache_dir, tmp_path):
    view, private = tiny
    low = view.public_y < 5  # a server whose public data holds classes 0-4 only
    view = dataclasses.replace(view, cache_dir=cache_dir, public_x=view.public_x[low], public_y=view.public_y[low])
    args = parse(['--mi-steps', '5', '--mi-restarts', '1', '--mi-variant', 'published'])
    attack = mi.ModelInversion()
    report = attack.score(attack.run(view, args), private, None, view, args, str(tmp_path))
    m = report.metrics
    s = m['settings']
    assert (s['variant'], s['loss'], s['tv_weight'], s['l2_weight'], s['jitter']) == ('published', 'ce', 0, 0, 0)
    assert 'published variant' in m['summary']
    # no public image of 5-9: the class-disjoint baseline is undefined, not made up; classes 5-9 of the
    # all-class baseline fall back to the mean of every public image
    assert m['class_disjoint']['no_attack_baseline']['count'] == 0
    assert m['class_disjoint']['no_attack_baseline']['attack_accuracy'] is None
    overall_mean = view.public_x.mean(0).squeeze(0).numpy()
    for c in range(5, 10):
        np.testing.assert_allclose(report.arrays['baseline_images'][c], overall_mean, atol=1e-6)
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize('flag', [['--mi-steps', '0'], ['--mi-restarts', '0'], ['--mi-lr', '0'],
                                  ['--mi-tv', '-1'], ['--mi-l2', 'nan'], ['--mi-jitter', '20']])
def test_bad_settings_end_in_a_user_error(tiny, flag):
    args = parse(flag)
    with pytest.raises(UserError):
        mi.ModelInversion().check(args)
    with pytest.raises(UserError):  # and run() refuses them too, before any work
        mi.ModelInversion().run(tiny[0], args)


def test_diverged_images_are_reported_failed_not_returned():
    """A model that answers NaN for every input: every image fails, none is passed off as a result."""
    model = CNN()
    with torch.no_grad():
        model.fc2.bias.fill_(float('nan'))
    images, log_prob = mi.invert(model, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), steps=3, lr=0.1)
    assert torch.isfinite(images).all() and (images == 0).all()
    assert (log_prob == -math.inf).all()
