import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from src import evaluation as ev
from src.data import Dataset
from src.model import CNN
from src.utils import load_torch, save_torch
from tests.conftest import synthetic_digits

# what the second evaluator (the MLP) must reach on the tiny synthetic fixture with its default epochs;
# measured 1.00 (test_second_evaluator_is_another_family_and_learns_the_fixture)
SECOND_MIN_ACCURACY = 0.95


def tiny_dataset(n_train=200, n_test=100, name='mnist'):
    tr_x, tr_y = synthetic_digits(n_train, 0)
    te_x, te_y = synthetic_digits(n_test, 1)
    return Dataset(name, tr_x, tr_y, te_x, te_y)


def weight_shapes(m):
    return {tuple(p.shape) for p in m.parameters() if p.dim() > 1}


def test_eval_classifier_is_a_different_architecture_from_the_target():
    target, evaluator = CNN(), ev.EvalClassifier()
    assert not weight_shapes(target) & weight_shapes(evaluator)  # not one weight matrix or kernel of the same shape
    kernels = {m.kernel_size for m in evaluator.modules() if isinstance(m, nn.Conv2d)}
    assert kernels == {(5, 5)} and {m.kernel_size for m in target.modules() if isinstance(m, nn.Conv2d)} == {(3, 3)}
    assert any(isinstance(m, nn.BatchNorm2d) for m in evaluator.modules())
    x = torch.rand(3, 1, 28, 28)
    evaluator.eval()
    assert evaluator(x).shape == (3, 10) and evaluator.features(x).shape == (3, 256)


def test_second_evaluator_is_another_family_and_learns_the_fixture(tmp_path):
    second = ev.PixelMLP()
    kinds = {type(m) for m in second.modules()}
    # another family: no convolution, no pooling, no normalisation layer at all; dropout present
    assert not any(issubclass(k, (nn.Conv2d, nn.MaxPool2d, nn.modules.batchnorm._BatchNorm)) for k in kinds)
    assert nn.Dropout in kinds and nn.Linear in kinds
    assert not weight_shapes(second) & weight_shapes(CNN())
    first = next(m for m in second.modules() if isinstance(m, nn.Linear))
    assert first.in_features == 28 * 28  # its first layer sees every pixel at once
    second.eval()
    assert second(torch.rand(3, 1, 28, 28)).shape == (3, 10)

    evaluators = ev.load_evaluators(tiny_dataset(), 0, str(tmp_path), 'cpu')
    assert isinstance(evaluators.primary, ev.EvalClassifier) and isinstance(evaluators.second, ev.PixelMLP)
    info = evaluators.info
    assert info['primary']['arch'] == 'evalnet-v1' and info['second']['arch'] == 'pixel-mlp-v1'
    assert info['primary']['family'] != info['second']['family']
    assert info['second']['test_accuracy'] >= SECOND_MIN_ACCURACY, info['second']
    assert info['second']['hparams']['epochs'] == ev.default_epochs(200, 'second')
    assert info['primary']['cache_path'] != info['second']['cache_path']
    assert all(os.path.isfile(i['cache_path']) and not i['from_cache'] for i in info.values())
    # memoised per process: the same model objects (their remembered private features with them)
    again = ev.load_evaluators(tiny_dataset(), 0, str(tmp_path), 'cpu')
    assert again.primary is evaluators.primary and again.second is evaluators.second
    assert all(i['from_cache'] for i in again.info.values())


class PixelReader(nn.Module):
    """Hand-made classifier: feature = the image itself; logit k = 10 * mean of row k (rows 0-9)."""

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return 10 * x[:, 0, :10, :].mean(2)

    def parameters(self, recurse=True):
        yield torch.zeros(1)


class ColumnReader(PixelReader):
    """A second hand-made classifier that reads column k instead of row k: it agrees with PixelReader only
    where the lit row and column have the same index."""

    def forward(self, x):
        return 10 * x[:, 0, :, :10].mean(1)


def row_image(k, value=1.0):
    x = torch.zeros(1, 28, 28)
    x[0, k] = value
    return x


def stub_evaluators(second=None):
    return ev.Evaluators(PixelReader(), second or PixelReader(), {})


def test_scores_on_hand_made_cases():
    private_x = torch.stack([row_image(0), row_image(1), row_image(2, 0.5), row_image(2)])
    private_y = torch.tensor([0, 1, 2, 2])
    images = torch.stack([
        private_x[1],           # exact copy of private image 1, attacking class 1
        row_image(2, 0.5),      # exact copy of a class-2 image
        row_image(1),           # shows a 1, but attacks class 0: compared only with class-0 images
        row_image(9),           # attacks class 9, of which there is no private image
    ])
    classes = torch.tensor([1, 2, 0, 9])
    s = ev.score_inversions(stub_evaluators(), images, classes, private_x, private_y)
    per = s['per_image']
    assert per['eval_prediction'] == per['second_prediction'] == [1, 2, 1, 9]
    assert per['correct'] == [True, True, False, True]
    assert per['knn_pixel_distance'][:2] == [0.0, 0.0] and per['knn_feature_distance'][:2] == [0.0, 0.0]
    assert per['nearest_private_index'][:3] == [1, 2, 0]
    # row-1 image vs row-0 image: 2 x 28 pixels differ by 1 -> L2 = sqrt(56)
    assert per['knn_pixel_distance'][2] == pytest.approx(56 ** 0.5)
    assert per['knn_pixel_distance'][3] is None and per['nearest_private_index'][3] == -1
    # confidence for the target class: softmax of logits that are 10 (own row lit) or 0 elsewhere
    p_lit = np.exp(10) / (np.exp(10) + 9)
    p_half = np.exp(5) / (np.exp(5) + 9)
    assert per['eval_confidence'] == pytest.approx([p_lit, p_half, 1 / (np.exp(10) + 9), p_lit], rel=1e-5)
    assert per['second_confidence'] == pytest.approx(per['eval_confidence'])
    o = s['overall']
    assert o['count'] == 4
    assert o['attack_accuracy'] == o['attack_accuracy_primary'] == o['attack_accuracy_second'] == 0.75
    assert o['knn_pixel_distance'] == pytest.approx((0 + 0 + 56 ** 0.5) / 3)  # class 9: undefined, left out
    assert s['per_class']['0']['attack_accuracy'] == 0.0 and s['per_class']['1']['attack_accuracy'] == 1.0
    assert s['per_class']['9']['knn_pixel_distance'] is None and s['per_class']['9']['count'] == 1
    assert 'target_confidence' not in o


def test_correct_needs_both_evaluators_to_read_the_target_class():
    """The primary reads rows, the second columns: an image is correct only where both read its class."""
    def image(row, col):
        x = torch.zeros(1, 28, 28)
        x[0, row] = 1
        x[0, :, col] = 1
        return x

    images = torch.stack([image(3, 3), image(3, 5), image(5, 3), image(4, 4)])
    classes = torch.tensor([3, 3, 3, 7])
    s = ev.score_inversions(stub_evaluators(ColumnReader()), images, classes, images, torch.tensor([3, 3, 3, 7]))
    per = s['per_image']
    assert per['eval_prediction'] == [3, 3, 5, 4] and per['second_prediction'] == [3, 5, 3, 4]
    assert per['correct'] == [True, False, False, False]
    o = s['overall']
    assert (o['attack_accuracy'], o['attack_accuracy_primary'], o['attack_accuracy_second']) == (0.25, 0.5, 0.5)
    assert s['per_class']['3']['attack_accuracy'] == pytest.approx(1 / 3)
    assert s['per_class']['3']['attack_accuracy_primary'] == pytest.approx(2 / 3)


def test_summarise_masks_handles_undefined_values_and_target_confidence():
    per = {'target_class': [0, 0, 1, 2], 'eval_prediction': [0, 1, 1, 2], 'second_prediction': [0, 0, 1, 0],
           'correct': [True, False, True, False], 'eval_confidence': [0.9, 0.2, 0.8, 0.7],
           'second_confidence': [0.9, 0.6, 0.8, 0.1],
           'knn_feature_distance': [1.0, None, 3.0, None], 'knn_pixel_distance': [2.0, 4.0, None, None],
           'nearest_private_index': [0, -1, 2, -1]}
    s = ev.summarise(per, np.array([True, True, True, False]), target_confidence=[0.5, 0.7, 0.9, 0.1])
    assert s == pytest.approx({'count': 3, 'attack_accuracy': 2 / 3, 'attack_accuracy_primary': 2 / 3,
                               'attack_accuracy_second': 1.0, 'eval_confidence': (0.9 + 0.2 + 0.8) / 3,
                               'knn_feature_distance': 2.0, 'knn_pixel_distance': 3.0, 'target_confidence': 0.7})
    only_undefined = ev.summarise(per, torch.tensor([False, False, False, True]))
    assert only_undefined['knn_feature_distance'] is None and only_undefined['knn_pixel_distance'] is None
    assert only_undefined['attack_accuracy'] == 0.0 and only_undefined['attack_accuracy_second'] == 0.0
    empty = ev.summarise(per, [False] * 4, target_confidence=np.ones(4))
    assert empty['count'] == 0 and all(v is None for k, v in empty.items() if k != 'count')
    assert all(type(v) in (int, float) for v in s.values())  # JSON-able, no numpy scalars
    with pytest.raises(ValueError):
        ev.summarise(per, [True, False])


def test_class_mean_images_on_a_hand_made_set():
    x = torch.zeros(5, 1, 28, 28)
    x[0], x[1], x[2], x[3], x[4] = 0.2, 0.4, 1.0, 0.5, 0.3
    x[3, 0, 0, 0] = 1.0
    y = torch.tensor([1, 1, 4, 4, 7])
    means = ev.class_mean_images(x, y, [4, 1, 0, 7])
    assert means.shape == (4, 1, 28, 28) and means.dtype == torch.float32
    expected_4 = torch.full((1, 28, 28), 0.75)
    expected_4[0, 0, 0] = 1.0
    torch.testing.assert_close(means[0], expected_4)
    torch.testing.assert_close(means[1], torch.full((1, 28, 28), 0.3))
    overall = x.mean(0)  # class 0 has no public image: the mean of everything given
    torch.testing.assert_close(means[2], overall)
    assert means[2, 0, 0, 0] == pytest.approx((0.2 + 0.4 + 1.0 + 1.0 + 0.3) / 5)
    torch.testing.assert_close(means[3], torch.full((1, 28, 28), 0.3))
    # uint8 pixels and numpy labels are accepted as elsewhere
    u8 = ev.class_mean_images(torch.full((2, 28, 28), 255, dtype=torch.uint8), np.array([3, 3]), [3])
    torch.testing.assert_close(u8, torch.ones(1, 1, 28, 28))


def test_exact_copy_of_a_training_image_has_knn_distance_zero_in_a_real_network():
    data = tiny_dataset()
    torch.manual_seed(0)
    evaluators = ev.Evaluators(ev.EvalClassifier().eval(), ev.PixelMLP().eval(), {})
    private_x = torch.from_numpy(data.train_images).float().div(255).unsqueeze(1)
    private_y = torch.from_numpy(data.train_labels.astype(np.int64))
    picks = torch.tensor([3, 50, 151])
    s = ev.score_inversions(evaluators, private_x[picks], private_y[picks], private_x, private_y)
    assert s['per_image']['knn_pixel_distance'] == [0.0, 0.0, 0.0]
    assert max(s['per_image']['knn_feature_distance']) < 1e-4
    assert s['per_image']['nearest_private_index'] == picks.tolist()
    # a perturbed copy is farther away than the copy itself
    noisy = (private_x[picks] + 0.2 * torch.rand(3, 1, 28, 28)).clamp(0, 1)
    s2 = ev.score_inversions(evaluators, noisy, private_y[picks], private_x, private_y)
    assert min(s2['per_image']['knn_pixel_distance']) > 1.0
    # another private set with the same model (its features are remembered per set): the copies are gone
    keep = torch.ones(len(private_y), dtype=torch.bool)
    keep[picks] = False
    s3 = ev.score_inversions(evaluators, private_x[picks], private_y[picks], private_x[keep], private_y[keep])
    assert min(s3['per_image']['knn_feature_distance']) > 1e-3 and min(s3['per_image']['knn_pixel_distance']) > 0


@pytest.mark.parametrize('kind', ['primary', 'second'])
def test_cache_is_reused_and_a_corrupt_cache_is_retrained(tmp_path, capsys, kind):
    data = tiny_dataset()
    def load(d=data, seed=0):
        return ev.load_or_train_eval_classifier(d, seed, str(tmp_path), epochs=2, kind=kind)

    model, info = load()
    assert not info['from_cache'] and os.path.isfile(info['cache_path'])
    assert isinstance(model, ev.EVALUATORS[kind].model) and info['kind'] == kind
    assert 0.0 <= info['test_accuracy'] <= 1.0
    load_torch(info['cache_path'])  # weights_only-loadable
    again, info2 = load()
    assert info2['from_cache'] and info2['cache_path'] == info['cache_path']
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    # another seed or other data: another file
    assert load(seed=1)[1]['cache_path'] != info['cache_path']
    assert load(d=tiny_dataset(n_train=210))[1]['cache_path'] != info['cache_path']

    # garbage bytes: retrained, not trusted
    with open(info['cache_path'], 'wb') as f:
        f.write(b'not a checkpoint')
    capsys.readouterr()
    _, info3 = load()
    out = capsys.readouterr()
    assert not info3['from_cache'] and 'corrupt' in out.out + out.err

    # loadable but tampered weights: the stored digest catches it
    saved = load_torch(info['cache_path'])
    saved['state_dict']['head.weight'] += 1
    save_torch(saved, info['cache_path'])
    _, info4 = load()
    assert not info4['from_cache']
    assert load()[1]['from_cache']


@pytest.fixture(scope='module')
def cache_files(tmp_path_factory):
    """{kind: (cache file name, its bytes)}: each evaluator trained once (one epoch) for the tampering tests."""
    base, data = tmp_path_factory.mktemp('eval_cache'), tiny_dataset()
    out = {}
    for kind in ('primary', 'second'):
        _, info = ev.load_or_train_eval_classifier(data, 0, str(base), epochs=1, kind=kind)
        out[kind] = (os.path.basename(info['cache_path']), open(info['cache_path'], 'rb').read())
    return out


@pytest.mark.parametrize('kind', ['primary', 'second'])
@pytest.mark.parametrize('value', ['not a tensor', 7, None, [1.0, 2.0], {'nested': 1}],
                         ids=['str', 'int', 'none', 'list', 'dict'])
def test_a_cached_state_dict_with_non_tensor_values_is_retrained_with_a_note(cache_files, tmp_path, capsys, kind,
                                                                              value):
    name, blob = cache_files[kind]
    path = tmp_path / name
    path.write_bytes(blob)
    saved = load_torch(str(path))
    saved['state_dict'][sorted(saved['state_dict'])[0]] = value
    save_torch(saved, str(path))
    capsys.readouterr()
    # no exception escapes
    model, again = ev.load_or_train_eval_classifier(tiny_dataset(), 0, str(tmp_path), epochs=1, kind=kind)
    out = capsys.readouterr()
    assert not again['from_cache'] and isinstance(model, ev.EVALUATORS[kind].model)
    assert 'note: ignoring corrupt' in out.out + out.err and 'not a state dict of tensors' in out.out + out.err
    assert all(isinstance(v, torch.Tensor) for v in load_torch(str(path))['state_dict'].values())  # rewritten


def test_training_is_reproducible_from_the_seed(tmp_path):
    data = tiny_dataset()
    for kind in ('primary', 'second'):
        a, _ = ev.load_or_train_eval_classifier(data, 3, str(tmp_path / 'a'), epochs=1, kind=kind)
        b, _ = ev.load_or_train_eval_classifier(data, 3, str(tmp_path / 'b'), epochs=1, kind=kind)
        for x, y in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(x, y)


def test_random_shift_moves_each_image_within_bounds():
    x = torch.zeros(50, 1, 28, 28)
    x[:, 0, 14, 14] = 1
    shifted = ev.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    pos = shifted.flatten(1).argmax(1)
    rows, cols = pos // 28, pos % 28
    assert shifted.flatten(1).sum(1).eq(1).all()  # the lit pixel stays inside the frame
    assert rows.sub(14).abs().max() <= 2 and cols.sub(14).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # per-image offsets, not one for the batch
