import argparse
import json
import os

import numpy as np
import pytest
import torch

from src.attacks import model_inversion as mi
from src.attacks.target import Target
from src.client import client_update
from src.data import Dataset, to_tensor
from src.model import CNN
from src.utils import UserError
from tests.conftest import synthetic_digits


@pytest.fixture(scope='module')
def tiny_target():
    """A CNN trained for a few seconds on learnable synthetic digits, wrapped as a Target."""
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
    indices = [np.arange(0, 150), np.arange(150, 300)]
    return Target(model=model, history={'config': {}}, data=data, train_x=x, train_y=y, test_x=to_tensor(te_x),
                  test_y=torch.from_numpy(te_y.astype(np.int64)), client_indices=indices, captured_path='',
                  device=torch.device('cpu'))


def confidence(model, x, classes):
    with torch.no_grad():
        return model(x).softmax(1).gather(1, classes[:, None]).squeeze(1)


@pytest.mark.parametrize('loss', ['logit', 'ce'])
def test_inversion_raises_the_target_class_confidence_far_above_its_start(tiny_target, loss):
    model = tiny_target.model
    x0, classes = mi.start_images(10, 2, 'noise', 0, 'cpu')
    before = confidence(model, x0, classes)
    images, log_prob = mi.invert(model, x0, classes, steps=40, lr=0.1, loss=loss)
    after = confidence(model, images, classes)
    assert before.mean() < 0.5
    assert after.mean() > 0.85 and (after - before).min() > 0.3, (before, after)
    torch.testing.assert_close(log_prob.exp(), after, atol=1e-5, rtol=1e-4)
    assert images.min() >= 0 and images.max() <= 1  # stays a valid image
    assert not model.training and all(p.requires_grad for p in model.parameters())  # model left as found


def test_batched_inversion_matches_one_image_at_a_time(tiny_target):
    """Classes and restarts in one batch must give each image exactly its own optimisation."""
    x0, classes = mi.start_images(3, 2, 'noise', 5, 'cpu')
    batched, lp = mi.invert(tiny_target.model, x0, classes, steps=10, lr=0.1, seed=5)
    for i in range(len(x0)):
        single, lp1 = mi.invert(tiny_target.model, x0[i:i + 1], classes[i:i + 1], steps=10, lr=0.1, seed=5)
        torch.testing.assert_close(single[0], batched[i], atol=1e-4, rtol=1e-4)


def test_regularisers_penalise_noise_more_than_a_smooth_image():
    noise = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    smooth = torch.zeros(1, 1, 28, 28)
    smooth[..., 8:20, 8:20] = 0.5
    assert mi.total_variation(noise) > 5 * mi.total_variation(smooth)
    assert mi.total_variation(torch.full((1, 1, 28, 28), 0.7)).item() == 0


def parse(argv=()):
    p = argparse.ArgumentParser()
    mi.add_arguments(p)
    args = p.parse_args(list(argv))
    args.seed, args.device = 0, 'cpu'
    return args


def test_run_writes_the_figure_and_consistent_metrics(tiny_target, tmp_path):
    args = parse(['--mi-steps', '30', '--mi-restarts', '3'])
    args.cache_dir = str(tmp_path / 'cache')
    metrics, arrays = mi.run(tiny_target, args, str(tmp_path / 'out'))
    assert os.path.isfile(tmp_path / 'out' / 'model_inversion_all.png')
    json.dumps(metrics, allow_nan=False)  # strict JSON
    assert arrays['best_images'].shape == (10, 28, 28) and arrays['all_restarts'].shape == (10, 3, 28, 28)
    assert arrays['best_images'].min() >= 0 and arrays['best_images'].max() <= 1
    # the best restart is the one the TARGET model was surest of
    conf = arrays['target_confidence_all']
    for c in range(10):
        b = metrics['per_class'][str(c)]['best_restart_index']
        assert conf[c, b] == conf[c].max()
        np.testing.assert_array_equal(arrays['best_images'][c], arrays['all_restarts'][c, b])
    # aggregates agree with the per-image predictions
    correct_all = arrays['eval_predictions_all'] == np.arange(10)[:, None]
    assert metrics['overall']['all_restarts']['attack_accuracy'] == pytest.approx(correct_all.mean())
    assert metrics['overall']['best_restart']['attack_accuracy'] == pytest.approx(
        (arrays['eval_predictions'] == np.arange(10)).mean())
    assert metrics['per_class']['3']['all_restarts']['attack_accuracy'] == pytest.approx(correct_all[3].mean())
    assert metrics['overall']['best_restart']['knn_pixel_distance'] > 0
    assert 0 <= metrics['eval_classifier']['test_accuracy'] <= 1
    assert {'seconds', 'seed', 'threat_model'} <= set(metrics)
    # the evaluation classifier was cached in --cache-dir and is reused on the next run
    assert not metrics['eval_classifier']['from_cache']
    again, arrays2 = mi.run(tiny_target, args, str(tmp_path / 'out'))
    assert again['eval_classifier']['from_cache']
    np.testing.assert_array_equal(arrays['all_restarts'], arrays2['all_restarts'])  # same seed, same result


@pytest.mark.parametrize('flag', [['--mi-steps', '0'], ['--mi-restarts', '0'], ['--mi-lr', '0'],
                                  ['--mi-tv', '-1'], ['--mi-jitter', '20']])
def test_bad_settings_end_in_a_user_error(tiny_target, tmp_path, flag):
    with pytest.raises(UserError):
        mi.run(tiny_target, parse(flag), str(tmp_path))


def test_diverged_images_are_reported_failed_not_returned():
    """A model that answers NaN for every input: every image fails, none is passed off as a result."""
    import math

    import torch

    from src.attacks.model_inversion import invert
    from src.model import CNN
    model = CNN()
    with torch.no_grad():
        model.fc2.bias.fill_(float('nan'))
    x0 = torch.rand(4, 1, 28, 28)
    images, log_prob = invert(model, x0, torch.tensor([0, 1, 2, 3]), steps=3, lr=0.1)
    assert torch.isfinite(images).all() and (images == 0).all()
    assert (log_prob == -math.inf).all()
