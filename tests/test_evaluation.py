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


def tiny_dataset(n_train=200, n_test=100, name='mnist'):
    tr_x, tr_y = synthetic_digits(n_train, 0)
    te_x, te_y = synthetic_digits(n_test, 1)
    return Dataset(name, tr_x, tr_y, te_x, te_y)


def test_eval_classifier_is_a_different_architecture_from_the_target():
    target, evaluator = CNN(), ev.EvalClassifier()
    shapes = lambda m: {tuple(p.shape) for p in m.parameters() if p.dim() > 1}  # noqa: E731
    assert not shapes(target) & shapes(evaluator)  # not one weight matrix or kernel of the same shape
    kernels = {m.kernel_size for m in evaluator.modules() if isinstance(m, nn.Conv2d)}
    assert kernels == {(5, 5)} and {m.kernel_size for m in target.modules() if isinstance(m, nn.Conv2d)} == {(3, 3)}
    assert any(isinstance(m, nn.BatchNorm2d) for m in evaluator.modules())
    x = torch.rand(3, 1, 28, 28)
    evaluator.eval()
    assert evaluator(x).shape == (3, 10) and evaluator.features(x).shape == (3, 256)


class PixelReader(nn.Module):
    """Hand-made classifier: feature = the image itself; logit k = 10 * mean of row k (rows 0-9)."""

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return 10 * x[:, 0, :10, :].mean(2)

    def parameters(self, recurse=True):
        yield torch.zeros(1)


def row_image(k, value=1.0):
    x = torch.zeros(1, 28, 28)
    x[0, k] = value
    return x


def test_scores_on_hand_made_cases():
    model = PixelReader()
    private_x = torch.stack([row_image(0), row_image(1), row_image(2, 0.5), row_image(2)])
    private_y = torch.tensor([0, 1, 2, 2])
    images = torch.stack([
        private_x[1],           # exact copy of private image 1, attacking class 1
        row_image(2, 0.5),      # exact copy of a class-2 image
        row_image(1),           # shows a 1, but attacks class 0: compared only with class-0 images
        row_image(9),           # attacks class 9, of which there is no private image
    ])
    classes = torch.tensor([1, 2, 0, 9])
    s = ev.score_inversions(model, images, classes, private_x, private_y)
    per = s['per_image']
    assert per['eval_prediction'] == [1, 2, 1, 9]
    assert per['knn_pixel_distance'][:2] == [0.0, 0.0] and per['knn_feature_distance'][:2] == [0.0, 0.0]
    assert per['nearest_private_index'][:3] == [1, 2, 0]
    # row-1 image vs row-0 image: 2 x 28 pixels differ by 1 -> L2 = sqrt(56)
    assert per['knn_pixel_distance'][2] == pytest.approx(56 ** 0.5)
    assert per['knn_pixel_distance'][3] is None and per['nearest_private_index'][3] == -1
    # confidence for the target class: softmax of logits that are 10 (own row lit) or 0 elsewhere
    p_lit = np.exp(10) / (np.exp(10) + 9)
    p_half = np.exp(5) / (np.exp(5) + 9)
    assert per['eval_confidence'] == pytest.approx([p_lit, p_half, 1 / (np.exp(10) + 9), p_lit], rel=1e-5)
    assert s['overall']['attack_accuracy'] == 0.75
    assert s['overall']['knn_pixel_distance'] == pytest.approx((0 + 0 + 56 ** 0.5) / 3)  # class 9: undefined
    assert s['per_class']['0']['attack_accuracy'] == 0.0 and s['per_class']['1']['attack_accuracy'] == 1.0
    assert s['per_class']['9']['knn_pixel_distance'] is None


def test_exact_copy_of_a_training_image_has_knn_distance_zero_in_a_real_network():
    data = tiny_dataset()
    torch.manual_seed(0)
    model = ev.EvalClassifier().eval()
    private_x = torch.from_numpy(data.train_images).float().div(255).unsqueeze(1)
    private_y = torch.from_numpy(data.train_labels.astype(np.int64))
    picks = torch.tensor([3, 50, 151])
    s = ev.score_inversions(model, private_x[picks], private_y[picks], private_x, private_y)
    assert s['per_image']['knn_pixel_distance'] == [0.0, 0.0, 0.0]
    assert max(s['per_image']['knn_feature_distance']) < 1e-4
    assert s['per_image']['nearest_private_index'] == picks.tolist()
    # a perturbed copy is farther away than the copy itself
    noisy = (private_x[picks] + 0.2 * torch.rand(3, 1, 28, 28)).clamp(0, 1)
    s2 = ev.score_inversions(model, noisy, private_y[picks], private_x, private_y)
    assert min(s2['per_image']['knn_pixel_distance']) > 1.0
    # another private set with the same model (its features are remembered per set): the copies are gone
    keep = torch.ones(len(private_y), dtype=torch.bool)
    keep[picks] = False
    s3 = ev.score_inversions(model, private_x[picks], private_y[picks], private_x[keep], private_y[keep])
    assert min(s3['per_image']['knn_feature_distance']) > 1e-3 and min(s3['per_image']['knn_pixel_distance']) > 0


def test_cache_is_reused_and_a_corrupt_cache_is_retrained(tmp_path, capsys):
    data = tiny_dataset()
    model, info = ev.load_or_train_eval_classifier(data, 0, str(tmp_path), epochs=2)
    assert not info['from_cache'] and os.path.isfile(info['cache_path'])
    assert 0.0 <= info['test_accuracy'] <= 1.0
    load_torch(info['cache_path'])  # weights_only-loadable
    again, info2 = ev.load_or_train_eval_classifier(data, 0, str(tmp_path), epochs=2)
    assert info2['from_cache'] and info2['cache_path'] == info['cache_path']
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    # another seed, other hyper-parameters or other data: another file
    assert ev.load_or_train_eval_classifier(data, 1, str(tmp_path), epochs=2)[1]['cache_path'] != info['cache_path']
    other = tiny_dataset(n_train=210)
    assert ev.load_or_train_eval_classifier(other, 0, str(tmp_path), epochs=2)[1]['cache_path'] != info['cache_path']

    # garbage bytes: retrained, not trusted
    with open(info['cache_path'], 'wb') as f:
        f.write(b'not a checkpoint')
    _, info3 = ev.load_or_train_eval_classifier(data, 0, str(tmp_path), epochs=2)
    out = capsys.readouterr()
    assert not info3['from_cache'] and 'corrupt' in out.out + out.err

    # loadable but tampered weights: the stored digest catches it
    saved = load_torch(info['cache_path'])
    saved['state_dict']['head.weight'] += 1
    save_torch(saved, info['cache_path'])
    _, info4 = ev.load_or_train_eval_classifier(data, 0, str(tmp_path), epochs=2)
    assert not info4['from_cache']
    assert ev.load_or_train_eval_classifier(data, 0, str(tmp_path), epochs=2)[1]['from_cache']


def test_training_is_reproducible_from_the_seed(tmp_path):
    data = tiny_dataset()
    a, _ = ev.load_or_train_eval_classifier(data, 3, str(tmp_path / 'a'), epochs=1)
    b, _ = ev.load_or_train_eval_classifier(data, 3, str(tmp_path / 'b'), epochs=1)
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
