import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.attacks import runner
from src.attacks.base import AttackerView, PrivateData
from src.attacks.common import descend
from src.attacks.gradient_inversion import GradientInversion, clients, closed_form, dlg, fedavg_rounds, layers, search
from src.attacks.gradient_inversion.invert import invert, invert_batches
import src.attacks.gradient_inversion.invert as invert_module
from src.attacks.gradient_inversion.labels import recover_labels
from src.attacks.gradient_inversion.scoring import label_count_accuracy, match_to_originals
from src.attacks.gradient_inversion.unseen import fill_unseen, shifted, unseen_pixels
from src.defenses import defend_gradients
from src.metrics import psnr
from src.model import CNN, MLP
from src.utils import UserError
from tests.conftest import synthetic_digits

NAMES = [name for name, _ in CNN().named_parameters()]


def tiny_batch(n, seed=0):
    """Synthetic digits: a bright block per class on uniform noise (0-40 of 255)."""
    images, labels = synthetic_digits(max(n, 10), seed)
    x = torch.from_numpy(images[:n]).float().div(255)[:, None]
    return x, torch.from_numpy(labels[:n].astype(np.int64))


def planted(n, seed=0):
    """Digit-like images the attack should recover almost exactly: a bright stroke shape on black, as
    MNIST, inside the 26x26 pixels that reach fc1 (floor pooling drops rows/columns 26-27)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    y = torch.randperm(10, generator=g)[:n]
    for i, c in enumerate(y.tolist()):
        r, col = 4 + 3 * (c % 4), 5 + 2 * (c // 4)
        x[i, 0, r:r + 14, col:col + 2] = 1.0
        x[i, 0, r:r + 2, col:col + 10] = 0.8
        x[i, 0, r + 12:r + 14, col:col + 10] = 0.9
    return x, y


def settings(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument('--seed', type=int, default=0)
    GradientInversion().add_arguments(parser)
    return parser.parse_args(list(argv))


# ----------------------------------------------------------------------------- the clients' side

def test_batched_per_example_grads_equal_autograd():
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(3)
    with layers.frozen(model):
        ours = layers.per_example_grads(model, x, F.one_hot(y, 10).float())
    ref = clients.client_gradients(model, x, y, 1, dropout=False)
    for name in NAMES:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-6, rtol=1e-4)


def test_per_example_client_gradients_are_the_batch_gradient_split_under_the_same_masks():
    # what DP-SGD clips: each example's gradient under the batch's own dropout masks
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(6)
    batch = clients.client_gradients(model, x, y, 3, dropout=True, seed=4)
    each = clients.client_gradients(model, x, y, 3, dropout=True, seed=4, per_example=True)
    for name in NAMES:
        assert each[name].shape == (2, 3, *batch[name].shape[1:])
        torch.testing.assert_close(each[name].mean(1), batch[name], atol=1e-7, rtol=1e-4)


def dp_config(sigma, clip):
    return {'dp_noise_multiplier': sigma, 'dp_max_grad_norm': clip, 'dp_learning_rate': 0.1, 'dp_local_epochs': 1,
            'dp_batch_size': 64}


def example_norms(each):
    return torch.sqrt(sum(v.flatten(2).pow(2).sum(2) for v in each.values()))  # (n, B)


def test_dp_sgd_clips_each_example_not_the_batch():
    # Abadi et al.: every example's gradient clipped to C, then averaged. Clipping the batch mean
    # instead (the old code) lets one large example dominate and gives another vector entirely.
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(4)
    x[0] *= 4  # one example with a much larger gradient
    each = clients.client_gradients(model, x, y, 4, dropout=False, seed=1, per_example=True)
    norms = example_norms(each)
    clip = norms.median().item()
    assert (norms > clip * 1.05).any() and (norms < clip * 0.95).any()
    scale = (clip / norms).clamp(max=1.0)  # (1, 4)
    expected = {k: (v * scale.view(1, 4, *[1] * (v.dim() - 2))).mean(1) for k, v in each.items()}
    sent = clients.sent_gradients(model, x, y, 4, False, dp_config(1e-9, clip), seed=0)
    for name in NAMES:
        torch.testing.assert_close(sent[name], expected[name], atol=1e-6, rtol=1e-4)


def test_dp_sgd_noise_on_the_batch_mean_is_sigma_clip_over_batch_size():
    # N(0, (sigma C)^2) is added once to the SUM of the clipped gradients, then divided by B: on the mean
    # its std is sigma C / B (the old code added sigma C to the mean: B times too much at B > 1)
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(4)
    clean = clients.client_gradients(model, x, y, 4, dropout=False, seed=1)
    each = clients.client_gradients(model, x, y, 4, dropout=False, seed=1, per_example=True)
    clip = 100 * example_norms(each).max().item()  # no example is clipped: only the noise differs
    sent = clients.sent_gradients(model, x, y, 4, False, dp_config(1.0, clip), seed=0)
    noise = layers.flat(sent) - layers.flat(clean)
    assert noise.std().item() == pytest.approx(clip / 4, rel=0.02)
    with pytest.raises(ValueError, match='clips every example'):
        defend_gradients(clean, dp_config(1.0, clip), torch.Generator())  # no per-example gradients given


def test_secure_aggregation_mean_equals_one_larger_batch():
    # the mean of K clients' batch-1 gradients is the gradient of one K-image batch
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(4)
    cfg = {'learning_rate': 0.1, 'num_clients': 4, 'secure_aggregation': True}
    assert clients.clients_per_gradient(cfg) == 4
    sent = clients.sent_gradients(model, x, y, 1, False, cfg)
    batch = clients.client_gradients(model, x, y, 4, dropout=False)
    for name in NAMES:
        torch.testing.assert_close(sent[name], batch[name], atol=1e-7, rtol=1e-4)


# ----------------------------------------------------------------------------- what leaks exactly

def test_label_and_fc1_input_recovery_are_exact_even_with_unknown_dropout():
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(6)
    for dropout in (False, True):
        grads = clients.client_gradients(model, x, y, 1, dropout=dropout, seed=3)
        assert torch.equal(recover_labels(grads['fc2.bias'], 1)[:, 0], y)  # iDLG: exact for one image
        a2 = closed_form.recover_fc_input(grads['fc1.weight'], grads['fc1.bias'])
        with torch.no_grad():
            torch.testing.assert_close(a2, model.features(x), atol=1e-5, rtol=1e-4)


def test_label_counts_for_batches():
    torch.manual_seed(0)
    model = CNN().eval()
    x, _ = tiny_batch(4)
    y = torch.tensor([2, 2, 5, 7])
    grads = clients.client_gradients(model, x, y, 4, dropout=False)
    labels = recover_labels(grads['fc2.bias'], 4)
    assert labels.shape == (1, 4)
    # an untrained model is near-uniform (p ~ 0.1), so -B db_j = count_j - sum_i p_ij ~ count_j - 0.4:
    # the negative mass apportions the counts exactly
    assert labels[0].tolist() == [2, 2, 5, 7]
    assert label_count_accuracy(y, labels[0], 4) == 1.0


@pytest.mark.parametrize('B,dropout', [(2, True), (8, True), (8, False), (16, True)])
def test_batch_fc1_inputs_and_labels_separate_exactly(B, dropout):
    """A planted batch on a small random model: every image's fc1 input and its label come back exactly from
    the batch's gradient (the sparse factorisation, SPEAR), dropout mask unknown or off."""
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(B)
    grads = clients.client_gradients(model, x, y, B, dropout=dropout, seed=3)
    parts = closed_form.separate_batch(grads['fc1.weight'][0], grads['fc1.bias'][0], B)
    assert parts is not None
    a2, d, ok = parts
    assert ok.all()
    with torch.no_grad():
        true = model.features(x)
    order = (a2[:, None] - true[None]).norm(dim=2).argmin(1)
    assert sorted(order.tolist()) == list(range(B))
    torch.testing.assert_close(a2, true[order], atol=1e-5, rtol=1e-4)
    errors = closed_form.output_errors(model, a2, d)
    assert torch.equal(errors.argmin(1), y[order])
    with torch.no_grad():  # p - onehot(y) itself, the dropout scale settled by the image's own dropped units
        model.train(dropout)
        torch.manual_seed(3)  # client_gradients' masks
        p = F.softmax(model(x), 1)
    torch.testing.assert_close(errors.float(), (p - F.one_hot(y, 10))[order], atol=1e-4, rtol=1e-3)


def _planted_batch_of_12(dropout):
    """A random CNN, 12 synthetic images' batch gradient, their per-image gradients, true fc1 inputs, and the
    features' zero rates on 200 other images (the attacker's public ones)."""
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(12, seed=1)
    grads = clients.client_gradients(model, x, y, 12, dropout=dropout, seed=3)
    per_image = clients.client_gradients(model, x, y, 12, dropout=dropout, seed=3, per_example=True)
    with torch.no_grad():
        true = model.features(x)
        zero_rate = (model.features(tiny_batch(200, seed=2)[0]) <= 0).float().mean(0)
    return model, grads, per_image['fc1.bias'][0], true, zero_rate


@pytest.mark.parametrize('dropout', [True, False])
def test_batch_fc1_inputs_separate_exactly_from_the_inputs_side(dropout):
    """The input-side separation on a planted batch of 12 (small random CNN): every image it returns as ok is
    exactly one of the batch's fc1 inputs, with its gradient at fc1's output, and it finds most of them. The
    features' zero rates come from other images (the attacker's public ones)."""
    model, grads, d_true, true, zero_rate = _planted_batch_of_12(dropout)
    a2, d, ok = closed_form.separate_by_inputs(grads['fc1.weight'][0], grads['fc1.bias'][0], 12,
                                               (model.fc1.weight, model.fc1.bias), model.fc2.weight, zero_rate)
    assert ok.sum() >= 10, ok
    order = (a2[ok][:, None] - true[None]).norm(dim=2).argmin(1)
    assert len(set(order.tolist())) == int(ok.sum())
    torch.testing.assert_close(a2[ok], true[order], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d[ok], d_true[order], atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize('dropout', [True, False])
def test_inputs_found_alone_are_exact_and_so_are_their_gradients(dropout):
    """inputs_alone on a planted batch of 12, nothing separated first: every input it returns is exactly one of the
    batch's fc1 inputs (each once), every gradient it returns is exactly that image's, and it finds most; given
    images already separated (their inputs and gradients), it returns only the others."""
    model, grads, d_true, true, zero_rate = _planted_batch_of_12(dropout)
    wg, bg = grads['fc1.weight'][0], grads['fc1.bias'][0]
    Xt, D = closed_form.inputs_alone(wg, bg, 12, zero_rate, model)
    assert len(Xt) >= 10, len(Xt)
    order = (Xt[:, None] - true[None]).norm(dim=2).argmin(1)
    assert len(set(order.tolist())) == len(Xt)
    torch.testing.assert_close(Xt, true[order], atol=1e-5, rtol=1e-4)
    has = D.any(1)
    assert has.sum() >= 6, has
    torch.testing.assert_close(D[has], d_true[order][has], atol=1e-6, rtol=1e-3)
    more = closed_form.inputs_alone(wg, bg, 12, zero_rate, model, known=(true[:6], d_true[:6]))
    assert more is not None
    rest = (more[0][:, None] - true[None]).norm(dim=2).argmin(1)
    assert (rest >= 6).all() and len(set(rest.tolist())) == len(rest)
    torch.testing.assert_close(more[0], true[rest], atol=1e-5, rtol=1e-4)


def test_the_last_image_left_may_dip_below_zero_by_the_noise_its_row_stands_clear_of():
    """One image left (rank 1): its input is the row, accepted where it dips below 0 by no more than the noise the
    next singular value measures, if the row stands 10x clear of that noise; else only to 1e-4 as before."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 50, generator=g, dtype=torch.float64)
    x[0, :10] = 0
    x[0, 3] = -2e-3 * x.max()  # the others' terms left over
    t = torch.tensor([0.5], dtype=torch.float64)
    found, rate = torch.rand(3, 50, generator=g, dtype=torch.float64), torch.full((50,), 0.25, dtype=torch.float64)

    def last(noise):
        return closed_form._inputs_in(x * t, t, 4, rate, found, g, 10, 1, 1, noise)

    torch.testing.assert_close(last(0.012), x)
    assert len(last(0.0)) == 0 and len(last(0.2)) == 0 and len(last(1e-3)) == 0


def test_an_inputs_gradient_is_the_models_or_none():
    """gradient_of: an image of the batch gets its own gradient at fc1's output, exactly (label and dropout mask
    told by the batch gradient's column space); an image not in the batch gets None, not a look-alike."""
    model, grads, d_true, true, _ = _planted_batch_of_12(dropout=True)
    L = torch.linalg.svd(grads['fc1.weight'][0].double(), full_matrices=False)[0][:, :12]
    generator = torch.Generator().manual_seed(0)
    found = 0
    for i in range(12):
        g = closed_form.gradient_of(true[i].double(), L, model, generator)
        if g is not None:
            torch.testing.assert_close(g.float(), d_true[i], atol=1e-6, rtol=1e-3)
            found += 1
    assert found >= 6, found
    with torch.no_grad():
        outsider = model.features(tiny_batch(20, seed=5)[0][15:])
    assert all(closed_form.gradient_of(a.double(), L, model, generator) is None for a in outsider)


def test_a_mixture_of_two_images_gradients_is_not_certified():
    """The check a column must pass: one image's gradient at fc1's output is W_fc2^T e on the units it passes; the
    sum of two images' is not."""
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(2)
    d = clients.client_gradients(model, x, y, 2, dropout=True, seed=3, per_example=True)['fc1.bias'][0].double()
    w2 = model.fc2.weight.detach().double()
    assert closed_form.certified(d[0], w2) and closed_form.certified(d[1], w2)
    assert not closed_form.certified(d[0] + d[1], w2)


def test_an_unread_image_takes_the_label_the_output_bias_gradient_leaves():
    """B * db_fc2 = sum_i (p_i - onehot(y_i)): with the read images' errors taken out, what is left is the unread
    images' own, so their labels come out exactly (one unread: iDLG; two: the counts of a batch of two), where
    the batch's counts alone would have to guess."""
    torch.manual_seed(0)
    model = CNN().eval()
    x, _ = tiny_batch(6)
    y = torch.tensor([3, 3, 1, 8, 3, 0])
    with torch.no_grad():
        errors = (F.softmax(model(x), 1) - F.one_hot(y, 10)).double()[None]  # (1 batch, 6, classes)
    bias_grad = errors.mean(1).float()
    for unread in ([4], [2, 5]):
        seen = errors.clone()
        seen[0, unread] = math.nan
        labels = invert_module.separated_labels(seen, bias_grad)[0]
        read = [i for i in range(6) if i not in unread]
        assert torch.equal(labels[read], y[read])
        assert sorted(labels[unread].tolist()) == sorted(y[unread].tolist())  # which unread image is which: unknown


def test_a_batch_of_one_image_repeated_does_not_separate():
    """Built to be unrecoverable as a batch: the same image four times is one rank-1 gradient, not four images;
    the separation says so instead of passing anything off (the attack then falls back to the cosine search)."""
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(1)
    grads = clients.client_gradients(model, x.repeat(4, 1, 1, 1), y.repeat(4), 4, dropout=False, seed=3)
    assert closed_form.separate_batch(grads['fc1.weight'][0], grads['fc1.bias'][0], 4) is None


def test_a_column_with_noisy_zeros_separates_at_the_lower_gap():
    """A planted factorisation whose first image's zeros are not exact (as a tiny-gradient image's are, by fp32
    rounding): at a 100x gap it does not separate, with the 30x fallback every input comes back. (Without the
    layer's weights to check columns against, 30x also takes a wrong column on some draws: seeds 0-3 at noise
    1e-3 to 6e-3 were tried, this one separates right at 1 and 2 threads.)"""
    g = torch.Generator().manual_seed(1)
    D = (torch.rand(64, 6, generator=g, dtype=torch.float64) + 0.5) * torch.where(
        torch.rand(64, 6, generator=g) < 0.7, 0.0, 1.0).double() * torch.where(
        torch.rand(64, 6, generator=g) < 0.5, -1.0, 1.0).double()  # 70 % zeros, non-zeros 0.5-1.5 in size
    zeros = D[:, 0] == 0
    D[zeros, 0] = 3e-3 * (2 * torch.rand(int(zeros.sum()), generator=g, dtype=torch.float64) - 1)
    X = torch.rand(40, 6, generator=g, dtype=torch.float64)
    assert closed_form.separate_batch(D @ X.T, D.sum(1), 6, gaps=(100.0,)) is None
    Xt, _, ok = closed_form.separate_batch(D @ X.T, D.sum(1), 6)
    assert ok.all()
    err = (Xt[:, None] - X.T[None]).norm(dim=2) / X.norm(dim=0)[None]
    assert sorted(err.argmin(1).tolist()) == list(range(6)) and err.amin(1).max() < 1e-3


def test_unseen_pixels_are_those_no_gradient_depends_on():
    """The CNN pools its 11x11 conv2 output to 5x5, so image rows and columns 26-27 never reach fc1: the mask is
    exactly those, and changing them leaves every gradient identical. An MLP sees every pixel."""
    torch.manual_seed(0)
    model = CNN()
    unseen = unseen_pixels(model)
    expected = torch.zeros(1, 28, 28, dtype=torch.bool)
    expected[:, 26:] = expected[:, :, 26:] = True
    assert torch.equal(unseen, expected)
    x, y = tiny_batch(2)
    changed = torch.where(unseen, torch.rand(x.shape), x)
    a, b = (clients.client_gradients(model, z, y, 2, dropout=False) for z in (x, changed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not unseen_pixels(MLP()).any()


def test_fill_unseen_predicts_the_pixels_public_images_determine():
    """Where the public images' unseen pixels are a linear function of their seen ones, the fill recovers them
    (ridge 1 on 500 images, not shifted, which would break the planted function: to 1e-2); where nothing is unseen,
    the images come back unchanged."""
    g = torch.Generator().manual_seed(0)
    unseen = torch.zeros(1, 6, 6, dtype=torch.bool)
    unseen[:, 5:] = unseen[:, :, 5:] = True
    mix = torch.rand(25, 11, generator=g) / 25

    def images(n):
        x = torch.zeros(n, 1, 6, 6)
        x[:, ~unseen] = torch.rand(n, 25, generator=g)
        x[:, unseen] = x[:, ~unseen] @ mix
        return x

    public, private = images(500), images(8)
    filled = fill_unseen(torch.where(unseen, 0.5, private), unseen, public, shift=0)
    torch.testing.assert_close(filled, private, atol=1e-2, rtol=0)
    assert torch.equal(fill_unseen(private, torch.zeros_like(unseen), public), private)


def test_two_separations_of_a_batch_merge_into_the_images_either_found():
    """The one that found more is kept, and the images only the other found fill its left-out slots; an input
    both found (the same direction) is not taken twice."""
    g = torch.Generator().manual_seed(0)
    X, D = torch.rand(4, 7, generator=g), torch.randn(4, 5, generator=g)

    def separation(images):  # found images first, then zero rows, ok False
        ok = torch.zeros(4, dtype=torch.bool)
        ok[:len(images)] = True
        return (torch.cat([X[images], torch.zeros(4 - len(images), 7)]),
                torch.cat([D[images], torch.zeros(4 - len(images), 5)]), ok)

    Xt, Dt, ok = invert_module._merged(separation([0, 1]), separation([2, 0, 1]), 4)
    assert ok.tolist() == [True, True, True, False]
    assert torch.equal(Xt[:3], X[[2, 0, 1]]) and torch.equal(Dt[:3], D[[2, 0, 1]])  # the larger one, as it was
    Xt, _, ok = invert_module._merged(separation([3, 1]), separation([1, 2]), 4)  # a tie: the first is kept
    assert ok.tolist() == [True, True, True, False] and torch.equal(Xt[:3], X[[3, 1, 2]])


def test_the_fill_also_learns_from_public_images_moved_by_a_pixel():
    """Each public image and its 8 copies moved one pixel each way, zero-filled (not wrapped round)."""
    x = torch.arange(1, 10, dtype=torch.float64).view(1, 1, 3, 3)
    moved = shifted(x, 1)
    assert moved.shape == (9, 1, 3, 3)
    assert torch.equal(moved[4], x[0])  # in place
    down_right = torch.tensor([[0., 0., 0.], [0., 1., 2.], [0., 4., 5.]], dtype=torch.float64)
    up_left = torch.tensor([[5., 6., 0.], [8., 9., 0.], [0., 0., 0.]], dtype=torch.float64)
    assert torch.equal(moved[0, 0], down_right) and torch.equal(moved[8, 0], up_left)


# ----------------------------------------------------------------------------- the searches

def test_feature_distance_vanishes_at_the_true_image_and_measures_a_conv_gradient_mismatch():
    # R-GAP's linearity: with dL/da2 known, the conv weight gradients computed through the true image's
    # pool/ReLU pattern are the client's; a client gradient twice as large is off by |g - 2g|^2/|2g|^2 = 1/4
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(2)
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    a2 = closed_form.recover_fc_input(grads['fc1.weight'], grads['fc1.bias'])
    G = grads['fc1.bias'] @ model.fc1.weight
    W2, W1 = grads['conv2.weight'].flatten(2), grads['conv1.weight'].flatten(2)
    tv = search.TV_WEIGHT * search.total_variation(x)
    with layers.frozen(model):
        exact, a2_dist = search.feature_distance(model, x.clone().requires_grad_(True), a2, G, W2, W1)
        doubled, _ = search.feature_distance(model, x.clone().requires_grad_(True), a2, G, 2 * W2, 2 * W1)
    assert a2_dist.max() < 1e-8
    torch.testing.assert_close(exact, tv, atol=1e-6, rtol=0)
    torch.testing.assert_close(doubled - tv, torch.full_like(tv, 0.25 * (1 + search.W1_WEIGHT)), atol=1e-4, rtol=0)


def test_each_image_keeps_the_start_whose_features_match_best(monkeypatch):
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(2)
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    captured = {}

    def record_the_choice(x0, loss_fn, steps, lr, narrow=None, **kw):
        captured['choose'] = narrow[1]
        return x0[:2], torch.zeros(2, dtype=torch.bool)

    monkeypatch.setattr(search, 'descend', record_the_choice)
    with layers.frozen(model):
        invert(model, grads, 'default', 1, progress=False)
        black = torch.zeros_like(x[0])
        # restart-major rows: (start 0: image 0, image 1), (start 1: image 0, image 1)
        chosen = captured['choose'](torch.stack([x[0], black, black, x[1]]))
    assert chosen.tolist() == [0, 3]  # image 0 from start 0, image 1 from start 1: where the features match


def test_default_attack_recovers_single_images_almost_exactly_under_unknown_dropout():
    torch.manual_seed(0)
    model = CNN()
    x, y = planted(2)
    grads = clients.client_gradients(model, x, y, 1, dropout=True, seed=1)
    result = invert(model, grads, 'default', 1, progress=False)  # the default steps
    assert torch.equal(result.labels, y) and not result.failed.any() and not result.restarted.any()
    assert (psnr(result.images, x) > 40).all(), psnr(result.images, x)
    assert model.training and all(p.requires_grad for p in model.parameters())  # model left as found


def test_batch_of_two_is_separated_and_both_images_recovered():
    torch.manual_seed(0)
    model = CNN()
    x, y = planted(2, seed=1)
    grads = clients.client_gradients(model, x, y, 2, dropout=True, seed=3)
    with layers.frozen(model):
        images, labels, failed, _, separated = invert_batches(model, grads, 2, 100, 2, torch.Generator().manual_seed(0),
                                                              progress=False)
    assert separated.tolist() == [True] and not failed.any()
    images, labels = match_to_originals(images, labels, x, 2)
    assert torch.equal(labels, y)  # separated images' labels are exact
    assert (psnr(images, x) > 30).all(), psnr(images, x)


def test_cosine_search_beats_the_public_mean_image():
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(2)
    public_mean = tiny_batch(100, seed=1)[0].mean(0, keepdim=True)
    grads = clients.client_gradients(model, x, y, 2, dropout=False)
    with layers.frozen(model):
        images, distance, failed, restarted = search.cosine_search(
            model, grads, recover_labels(grads['fc2.bias'], 2), 2, 60, torch.Generator().manual_seed(0), progress=False)
    assert not failed.any() and not restarted.any() and distance.item() < 0.1
    images, _ = match_to_originals(images, y, x, 2)
    assert (psnr(images, x) > psnr(public_mean.expand_as(x), x) + 2).all(), psnr(images, x)


def test_idlg_label_is_exact_and_lbfgs_closes_the_gradient_gap():
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(1)
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    label = recover_labels(grads['fc2.bias'], 1)[0, 0]
    start = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # dlg_lbfgs's first draw
    with layers.frozen(model):
        d0 = search.relative_distance(layers.flat(layers.per_example_grads(model, start, F.one_hot(y, 10).float())),
                                      layers.flat(grads))
        image, lab, d = dlg.dlg_lbfgs(model, grads, label, 5, False, torch.Generator().manual_seed(0))
    assert torch.equal(lab, y)
    assert d.item() < 0.05 * d0.item()
    assert psnr(image.clamp(0, 1), x) > psnr(start, x) + 5


@pytest.mark.parametrize('method', ['idlg', 'dlg'])
def test_dlg_methods_through_invert(method):
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(2)
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    result = invert(model, grads, method, 1, iterations=2, progress=False)
    assert result.images.shape == x.shape and torch.isfinite(result.images).all() and not result.failed.any()
    if method == 'idlg':
        assert torch.equal(result.labels, y)
    with pytest.raises(UserError, match='single-image'):
        invert(model, grads, method, 2, iterations=1, progress=False)


def test_narrowing_to_the_chosen_starts_keeps_their_optimiser_state():
    # rows are independent (a loss per row, Adam elementwise), so dropping rows midway must leave the
    # kept ones exactly where they would be had they run alone, moments and schedule included
    torch.manual_seed(0)
    x0 = torch.rand(6, 1, 28, 28)

    def loss(x, step):
        return (x - 0.3).pow(2).flatten(1).sum(1) + (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)

    rows = torch.tensor([4, 1])
    narrowed, diverged = descend(x0, loss, 20, 0.05, milestones=search.MILESTONES, narrow=(7, lambda x: rows))
    alone, _ = descend(x0[rows], loss, 20, 0.05, milestones=search.MILESTONES)
    assert torch.equal(narrowed, alone) and diverged.shape == (2,) and not diverged.any()


# ----------------------------------------------------------------------------- divergence

def test_a_diverged_image_is_restarted_once_and_recovered(monkeypatch):
    torch.manual_seed(0)
    model = CNN()
    x, y = planted(2)
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    real = search.feature_distance

    def diverges_in_the_first_search(model, x, *targets, **kwargs):
        total, a2_dist = real(model, x, *targets, **kwargs)
        if len(x) > 1:  # image 1 in the first search (2 images x starts); the restart searches it alone
            total = total.masked_fill(torch.arange(len(x)) % 2 == 1, math.nan)
        return total, a2_dist

    monkeypatch.setattr(search, 'feature_distance', diverges_in_the_first_search)
    result = invert(model, grads, 'default', 1, progress=False)
    assert result.restarted.tolist() == [False, True] and not result.failed.any()
    assert (psnr(result.images, x) > 30).all(), psnr(result.images, x)


def test_an_image_that_diverges_again_is_flagged_failed_not_passed_off():
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(2)
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    grads['conv2.weight'][1] = math.nan
    result = invert(model, grads, 'default', 1, iterations=5, progress=False)
    assert result.failed.tolist() == [False, True] and result.restarted.tolist() == [False, True]
    assert torch.all(result.images[1] == 0) and torch.isfinite(result.images).all()


def test_a_diverged_batch_in_the_cosine_search_is_restarted_once(monkeypatch):
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(4)
    grads = clients.client_gradients(model, x, y, 2, dropout=False)
    real = layers.batch_grads

    def diverges_in_the_first_search(model, x, targets, batch_size, create_graph=False):
        g = real(model, x, targets, batch_size, create_graph)
        if len(x) == 4:  # both batches: the first search; the restart searches batch 1 alone
            second = (torch.arange(2) == 1)
            g = {k: torch.where(second.view(2, *[1] * (v.dim() - 1)), math.nan, v) for k, v in g.items()}
        return g

    monkeypatch.setattr(layers, 'batch_grads', diverges_in_the_first_search)
    with layers.frozen(model):
        images, _, failed, restarted = search.cosine_search(model, grads, recover_labels(grads['fc2.bias'], 2), 2, 5,
                                                            torch.Generator().manual_seed(0), progress=False)
    assert restarted.tolist() == [False, True] and not failed.any() and torch.isfinite(images).all()


# ----------------------------------------------------------------------------- scoring and simulation

def test_assignment_undoes_a_shuffle_inside_batches():
    x, y = tiny_batch(4)
    perm = torch.tensor([2, 0, 3, 1])
    recon, labels = match_to_originals(x[perm], y[perm], x, 4)
    assert torch.equal(recon, x) and torch.equal(labels, y)


def test_batched_client_forward_and_local_steps_match_the_model():
    torch.manual_seed(0)
    models = [CNN().eval() for _ in range(2)]
    x, y = tiny_batch(6)
    x, y = x.view(2, 3, 1, 28, 28), y.view(2, 3)
    w = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k in NAMES}
    with torch.no_grad():
        ref = torch.stack([m(xi) for m, xi in zip(models, x)])
    torch.testing.assert_close(layers.clients_logits(models[0], w, x), ref, atol=1e-5, rtol=1e-4)
    # two simulated SGD steps from one global model equal two real steps on each client's batch
    start = {k: v[0] for k, v in w.items()}
    sim = fedavg_rounds.simulate_updates(CNN(), start, x, y, 2, 0.1)
    for c in range(2):
        m = CNN().eval()
        m.load_state_dict(models[0].state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(m(x[c]), y[c]).backward()
            opt.step()
        for k, p in m.named_parameters():
            torch.testing.assert_close(sim[k][c], p.detach() - start[k], atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- the Attack, honestly

def server_and_clients(captured=None, num_clients=2, per_client=12):
    """(AttackerView without observations, PrivateData): an untrained CNN, clients holding synthetic
    digits, and public data unlike theirs (so a baseline computed from the wrong data shows)."""
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(num_clients * per_client, seed=2)
    public_x, public_y = tiny_batch(40, seed=3)
    public_x = public_x * 0.5  # a dimmer public set: its mean image differs from the clients'
    cfg = {'learning_rate': 0.1, 'num_clients': num_clients, 'secure_aggregation': False}
    view = AttackerView(model=model, training={'config': cfg}, captured=captured, public_x=public_x,
                        public_y=public_y, dataset='mnist', device=torch.device('cpu'))
    indices = [np.arange(c * per_client, (c + 1) * per_client) for c in range(num_clients)]
    return view, PrivateData(train_x=x, train_y=y, client_indices=indices, dataset=None)


def recorded_round(view, private, lr=0.1):
    """The server's record of one FedAvg round: each client's update after one SGD step on its images."""
    state = {k: v.detach().clone() for k, v in view.model.state_dict().items()}
    updates = []
    for c in range(len(private.client_indices)):
        m = CNN().eval()
        m.load_state_dict(state)
        x, y = private.client(c)
        F.cross_entropy(m(x), y).backward()
        updates.append({'client': c, 'num_samples': len(y),
                        'delta': {k: -lr * p.grad.detach() for k, p in m.named_parameters()}})
    return {'format': 1, 'meta': {'local_epochs': 1, 'batch_size': 64, 'learning_rate': lr},
            'rounds': [{'round': 1, 'global_state': state, 'updates': updates}]}


def tensors_in(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def test_run_needs_only_the_attackers_view(tmp_path):
    view, private = server_and_clients()
    args = settings('--gi-images', '2', '--gi-iterations', '20', '--no-gi-rounds', '--gi-map-steps', '2')
    attack = GradientInversion()
    attack.check(args)
    observation = attack.observe(private, view, args)
    # what the server receives holds gradients and the announced batch size, never an image
    sent = observation.sent
    assert set(sent['gradients']) == {'off', 'unknown'} and sent['batch_size'] == 1
    assert all(g.shape[0] == 2 for case in sent['gradients'].values() for g in case.values())
    assert not any(t.shape[-2:] == (28, 28) for t in tensors_in(sent))
    # a view built directly: the server's fields and the observation, nothing of the clients'
    server = AttackerView(model=view.model, training=view.training, captured=None, public_x=view.public_x,
                          public_y=view.public_y, dataset='mnist', device=view.device, observed=sent)
    assert {f.name for f in dataclasses.fields(server)}.isdisjoint({'train_x', 'train_y', 'client_indices'})
    result = attack.run(server, args)
    report = attack.score(result, private, observation.truth, server, args, str(tmp_path))
    m = report.metrics
    for case in ('main', 'dropout_off', 'dropout_unknown'):
        assert {'recovered_25db', 'recovered_30db', 'recovered_threshold_db', 'psnr_mean', 'label_accuracy',
                'n_failed', 'n_restarted'} <= set(m[case])
    assert m['main']['case'] == 'dropout_unknown' and m['main']['label_accuracy'] == 1.0  # iDLG: exact at batch 1
    for path, _, kind in attack.headline:
        value = m
        for part in path.split('.'):
            value = value[part]
        assert isinstance(value, float) and (kind != 'fraction' or 0 <= value <= 1), (path, value)
    # the no-attack baseline is the PUBLIC data's mean image, not the clients'
    originals = observation.truth['images']
    assert m['baselines']['dataset_mean_psnr_mean'] == pytest.approx(
        psnr(view.public_x.mean(0, keepdim=True).expand_as(originals), originals).mean().item())
    assert m['baselines']['dataset_mean_psnr_mean'] != pytest.approx(
        psnr(private.train_x.mean(0, keepdim=True).expand_as(originals), originals).mean().item(), abs=0.1)
    for key in ('summary', 'threat_model', 'seed', 'method', 'batch_size', 'images'):
        assert key in m
    assert (tmp_path / 'gradient_inversion_idlg.png').exists()
    assert report.arrays['reconstructions_dropout_unknown'].shape == (2, 28, 28)
    leakage = m['leakage_map']  # the small map: FedSGD by batch size, FedAvg cells; no record, so no preset corner
    assert [c['batch_size'] for c in leakage['fedsgd']] == [1, 8] and 'preset' not in leakage
    assert {(c['images_per_client'], c['local_steps']) for c in leakage['fedavg']} <= {(5, 1), (5, 2), (5, 5)}
    for c in leakage['fedsgd'] + leakage['fedavg']:
        assert 0 <= c['recovered_30db'] <= c['recovered_25db'] <= 1 and c['seconds'] > 0
    assert leakage['fedavg_start'] == 'final' and leakage['summary'].endswith('.')
    assert (tmp_path / 'leakage_map.png').exists()


def test_run_refuses_to_work_without_what_it_needs():
    view, _ = server_and_clients()
    with pytest.raises(ValueError, match='observe'):
        GradientInversion().run(view, settings('--no-gi-rounds'))
    with pytest.raises(UserError, match='no recorded updates'):
        GradientInversion().run(dataclasses.replace(view, observed={'gradients': {}}), settings())


def test_fedavg_rounds_through_the_runner_are_scored_against_each_clients_images(tmp_path):
    view, private = server_and_clients()
    view = dataclasses.replace(view, captured=recorded_round(view, private))
    args = settings('--gi-images', '2', '--gi-iterations', '5', '--gi-dropout', 'off', '--gi-rounds-steps', '3',
                    '--gi-map-steps', '2')
    metrics, arrays = runner.run_attacks(view, private, args, str(tmp_path), ['gradient'], log=lambda *a: None)
    m = metrics['gradient_inversion']
    # the map starts its FedAvg clients from the record's model, and its presets' corner is the record itself
    corner = m['leakage_map']['preset']
    n = round(np.mean([len(ix) for ix in private.client_indices]))
    assert m['leakage_map']['fedavg_start'] == 'round 1' and (corner['images_per_client'], corner['local_steps']) == (
        n, math.ceil(n / 64))
    first = m['fedavg_rounds']['rounds'][0]['clients']
    assert corner['recovered_25db'] == np.mean([c['recovered_25db'] for c in first])
    assert 'dropout_unknown' not in m and m['main']['case'] == 'dropout_off'
    rounds = m['fedavg_rounds']
    assert [r['round'] for r in rounds['rounds']] == [1] and rounds['simulated_local_steps'] == 1
    public_mean = view.public_x.mean(0, keepdim=True)
    for c in rounds['rounds'][0]['clients']:
        real = private.client(c['client'])[0]
        assert c['client_images'] == len(real) and len(c['dummy_labels']) == 4
        assert c['black_image_psnr_max'] == pytest.approx(psnr(torch.zeros_like(real), real).max().item())
        nearest = real[(public_mean - real).pow(2).flatten(1).mean(1).topk(4, largest=False).indices]
        assert c['mean_image_psnr_mean'] == pytest.approx(psnr(public_mean.expand_as(nearest), nearest).mean().item())
        assert c['psnr_max'] >= c['psnr_mean']
    assert arrays['gradient_inversion/fedavg_rounds_best_dummy'].shape == (1, 28, 28)
    assert (tmp_path / 'gradient_inversion_rounds.png').exists()


@pytest.mark.parametrize('argv', [['--gi-images', '0'], ['--gi-batch-size', '0'], ['--gi-restarts', '0'],
                                  ['--gi-iterations', '0'], ['--gi-rounds-dummies', '0'], ['--gi-rounds-steps', '0'],
                                  ['--gi-rounds-local-steps', '0'], ['--gi-method', 'idlg', '--gi-batch-size', '2']])
def test_check_refuses_impossible_flags(argv):
    with pytest.raises(UserError):
        GradientInversion().check(settings(*argv))


def test_observe_refuses_single_image_methods_under_secure_aggregation():
    view, private = server_and_clients()
    view = dataclasses.replace(view, training={'config': dict(view.config, secure_aggregation=True)})
    with pytest.raises(UserError, match='secure aggregation'):
        GradientInversion().observe(private, view, settings('--gi-method', 'dlg'))
