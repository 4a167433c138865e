"""The multi-step FedAvg attack (Dimitrov et al. 2022): its simulation is the client's training, its label
counts are right, and a client whose update cannot reveal its images is not reported as recovered."""
import copy

import torch

import pytest

from src.attacks.gradient_inversion import fedavg
from src.attacks.gradient_inversion.invert import Inversion
from src.attacks.gradient_inversion.leakage_map import _scores, schedule
from src.client import client_update
from src.data import MNIST_SPEC
from src.model import CNN
from tests.conftest import synthetic_digits


def client(n, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = CNN(MNIST_SPEC, dropout=dropout)
    images, labels = synthetic_digits(n, seed)
    return model, torch.as_tensor(images, dtype=torch.float32)[:, None] / 255, torch.as_tensor(labels).long()


def shuffled(images, labels, epochs, seed):
    """The epochs' images in the order client_update takes them with a generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(len(labels), generator=g) for _ in range(epochs)])
    return images[order], labels[order]


def test_simulated_local_training_is_client_update_bit_for_bit():
    model, x, y = client(4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for epochs, batch_size in ((1, 2), (2, 3)):  # 2 steps; then 4 steps with a short last batch
        trained, _ = client_update(copy.deepcopy(model), x, y, epochs, batch_size, 0.05,
                                   generator=torch.Generator().manual_seed(7))
        simulated, confidence = fedavg.local_training(model, start, *shuffled(x, y, epochs, 7), batch_size, 0.05)
        assert len(confidence) == epochs * len(fedavg.batch_slices(4, batch_size))
        for k, v in simulated.items():
            assert torch.equal(v, trained[k]), k


def test_simulation_is_differentiable_in_the_images():
    model, x, y = client(4)
    start = dict(model.state_dict())
    ex, ey = shuffled(x, y, 2, 0)
    ex = ex.clone().requires_grad_(True)
    w, _ = fedavg.local_training(model, start, ex, ey, 2, 0.05, create_graph=True)
    (w['fc1.weight'] - start['fc1.weight']).pow(2).sum().backward()
    assert ex.grad is not None and ex.grad.abs().sum() > 0


def test_label_counts_from_a_multi_step_update():
    model, x, y = client(20, seed=1)
    public, public_y = client(400, seed=2)[1:]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trained, _ = client_update(copy.deepcopy(model), x, y, 3, 5, 0.05, generator=torch.Generator().manual_seed(3))
    bias = trained['fc2.bias'] - start['fc2.bias']
    counts = fedavg.estimate_label_counts(model, start, bias, 20, 3, 5, 0.05, public, public_y,
                                          torch.Generator().manual_seed(0))
    true = torch.bincount(y, minlength=10)
    assert int(counts.sum()) == 20
    assert int(torch.minimum(counts, true).sum()) >= 19  # at most one image's label off


@pytest.mark.parametrize('n, steps, epochs, batch_size', [
    (1600, 125, 5, 64),  # the standard preset's client
    (1600, 10, 1, 160), (1600, 1, 1, 1600), (200, 10, 2, 40), (5, 25, 25, 5), (50, 1, 1, 50)])
def test_a_map_cell_takes_exactly_its_local_steps(n, steps, epochs, batch_size):
    assert schedule(n, steps) == (epochs, batch_size)
    assert epochs * len(fedavg.batch_slices(n, batch_size)) == steps


def test_an_update_that_holds_nothing_is_not_reported_as_recovered():
    """Built to be unrecoverable: the client's real update replaced by noise of its size. The attack runs to the
    end and its reconstructions score as nothing recovered, not as success."""
    model, x, y = client(5, seed=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trained, _ = client_update(copy.deepcopy(model), x, y, 2, 5, 0.05, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    noise = {k: torch.randn(v.shape, generator=g) * (trained[k] - v).norm() / v.numel() ** 0.5
             for k, v in start.items()}
    images, labels, failed = fedavg.invert_fedavg(model, start, noise, 5, 2, 5, 0.05, 30,
                                                  torch.Generator().manual_seed(0), *client(200, seed=5)[1:])
    assert images.shape == (5, 1, 28, 28) and labels.shape == (5,) and not failed.any()
    scores = _scores(x, Inversion(images, labels, failed, torch.zeros(5, dtype=torch.bool)), y, 5)
    assert scores['recovered_25db'] == 0 and scores['psnr_mean'] < 20
