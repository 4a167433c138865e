import math

import numpy as np
import torch
import torch.nn.functional as F

from src.attacks import gradient_inversion as gi
from src.metrics import psnr
from src.model import CNN
from tests.conftest import synthetic_digits


def tiny_batch(n, seed=0):
    images, labels = synthetic_digits(max(n, 10), seed)
    x = torch.from_numpy(images[:n]).float().div(255)[:, None]
    return x, torch.from_numpy(labels[:n].astype(np.int64))


def test_batched_per_example_grads_equal_autograd():
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(3)
    with gi.frozen(model):
        ours = gi.per_example_grads(model, x, F.one_hot(y, 10).float())
    ref = gi.client_gradients(model, x, y, 1, dropout=False)
    for name in gi.NAMES:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-6, rtol=1e-4)


def test_label_and_fc1_input_recovery_are_exact_even_with_unknown_dropout():
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(6)
    for dropout in (False, True):
        grads = gi.client_gradients(model, x, y, 1, dropout=dropout, seed=3)
        assert torch.equal(gi.recover_labels(grads['fc2.bias'], 1)[:, 0], y)
        a2 = gi.recover_fc_input(grads['fc1.weight'], grads['fc1.bias'])
        with torch.no_grad():
            torch.testing.assert_close(a2, model.features(x), atol=1e-5, rtol=1e-4)


def test_label_counts_for_batches():
    torch.manual_seed(0)
    model = CNN().eval()
    x, _ = tiny_batch(4)
    y = torch.tensor([2, 2, 5, 7])
    grads = gi.client_gradients(model, x, y, 4, dropout=False)
    labels = gi.recover_labels(grads['fc2.bias'], 4)
    assert labels.shape == (1, 4)
    assert set(labels[0].tolist()) == {2, 5, 7}   # present classes exactly (negative bias gradient)
    assert gi.label_count_accuracy(y, labels[0], 4) >= 0.75


def test_default_reconstruction_beats_gray_by_far_on_untrained_model():
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(2)
    grads = gi.client_gradients(model, x, y, 1, dropout=True, seed=1)
    recon, labels, failed = gi.invert(model, grads, 'default', 1, progress=False)  # the default steps
    assert torch.equal(labels, y) and not failed.any()
    gray = psnr(torch.full_like(x, 0.5), x)
    assert torch.all(psnr(recon, x) > gray + 10), (psnr(recon, x), gray)
    assert model.training and all(p.requires_grad for p in model.parameters())  # model left as found


def test_narrowing_to_the_chosen_starts_keeps_their_optimiser_state():
    # rows are independent (a loss per row, Adam elementwise), so dropping rows midway must leave the
    # kept ones exactly where they would be had they run alone, moments and schedule included
    torch.manual_seed(0)
    x0 = torch.rand(6, 1, 28, 28)
    loss = lambda x: (x - 0.3).pow(2).flatten(1).sum(1) + (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1)  # noqa: E731
    rows = torch.tensor([4, 1])
    narrowed, diverged = gi.descend(x0.clone().requires_grad_(True), loss, 20, 0.05, narrow=(7, lambda x: rows))
    alone, _ = gi.descend(x0[rows].clone().requires_grad_(True), loss, 20, 0.05)
    assert torch.equal(narrowed, alone) and diverged.shape == (2,) and not diverged.any()


def test_divergence_is_flagged_not_passed_off():
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(2)
    grads = gi.client_gradients(model, x, y, 1, dropout=False)
    grads['conv2.weight'][1] = math.nan
    recon, _, failed = gi.invert(model, grads, 'default', 1, iterations=5, progress=False)
    assert failed.tolist() == [False, True]
    assert torch.all(recon[1] == 0) and torch.isfinite(recon).all()


def test_assignment_undoes_a_shuffle_inside_batches():
    x, y = tiny_batch(4)
    perm = torch.tensor([2, 0, 3, 1])
    recon, labels = gi.match_to_originals(x[perm], y[perm], x, 4)
    assert torch.equal(recon, x) and torch.equal(labels, y)


def test_secure_aggregation_mean_equals_one_larger_batch():
    # what run() relies on: the mean of K clients' batch-1 gradients is the gradient of one K-image batch
    torch.manual_seed(0)
    model = CNN().eval()
    x, y = tiny_batch(4)
    singles = gi.client_gradients(model, x, y, 1, dropout=False)
    batch = gi.client_gradients(model, x, y, 4, dropout=False)
    for name in gi.NAMES:
        torch.testing.assert_close(singles[name].mean(0, keepdim=True), batch[name], atol=1e-7, rtol=1e-4)


def test_batch_fc1_inputs_and_labels_separate_exactly():
    # B=2 under an unknown dropout mask: units active for one image only give its fc1 input exactly
    torch.manual_seed(0)
    model = CNN()
    x, y = tiny_batch(2)
    grads = gi.client_gradients(model, x, y, 2, dropout=True, seed=3)
    parts = gi.separate_fc_inputs(grads['fc1.weight'][0], grads['fc1.bias'][0], 2)
    assert parts is not None
    a2, d = parts
    with torch.no_grad():
        true = model.features(x)
    order = (a2[:, None] - true[None]).norm(dim=2).argmin(1)
    assert sorted(order.tolist()) == [0, 1]
    torch.testing.assert_close(a2, true[order], atol=1e-5, rtol=1e-4)
    assert torch.equal(gi.labels_from_fc1_output_grads(model, d), y[order])


def test_batched_client_forward_and_local_steps_match_the_model():
    torch.manual_seed(0)
    models = [CNN().eval() for _ in range(2)]
    x, y = tiny_batch(6)
    x, y = x.view(2, 3, 1, 28, 28), y.view(2, 3)
    w = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k in gi.NAMES}
    with torch.no_grad():
        ref = torch.stack([m(xi) for m, xi in zip(models, x)])
    torch.testing.assert_close(gi.clients_logits(w, x), ref, atol=1e-5, rtol=1e-4)
    # two simulated SGD steps from one global model equal two real steps on each client's batch
    start = {k: v[0] for k, v in w.items()}
    sim = gi.simulate_updates(start, x, y, 2, 0.1)
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
