"""The model registry and the attacks on any model: the generic (torch.func) paths give the hand-written CNN's
numbers, every registry model trains and is attacked on any image shape, and the whole pipeline runs on a
3-channel 32x32 CIFAR-10-format dataset."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import run_all_attacks
from src.attacks.gradient_inversion import clients, fedavg_rounds, layers, search
from src.attacks.gradient_inversion.invert import invert
from src.attacks.gradient_inversion.scoring import match_to_originals
from src.data import MNIST_SPEC, DatasetSpec
from src.federated import train
from src.metrics import psnr
from src.model import CNN, MODELS, create_model
from tests.conftest import make_cifar_dir, synthetic_digits, tiny_config

RGB = DatasetSpec((3, 32, 32), 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


class GenericCNN(CNN):
    """The CNN, seen by the attack as any other model: layers.is_cnn is False, so the feature search takes the
    torch.func path."""


def digits(n, seed=0):
    x, y = synthetic_digits(n, seed)
    return torch.from_numpy(x).float().div(255).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('spec', [MNIST_SPEC, RGB], ids=['1x28x28', '3x32x32'])
def test_every_model_is_built_for_the_spec(name, spec):
    model = create_model(name, spec)
    assert model(torch.rand(4, *spec.shape)).shape == (4, spec.num_classes)
    assert layers.first_fc(model)[1].bias is not None and layers.output_bias(model) in dict(model.named_parameters())


def test_the_feature_search_terms_of_any_model_equal_the_cnns():
    """fc_input_and_grads (torch.func) gives what the CNN's written-out path (unfolded convolutions) gives: the
    same distance, differentiable in x."""
    torch.manual_seed(1)
    model = CNN().eval()
    generic = GenericCNN().eval()
    generic.load_state_dict(model.state_dict())
    x, y = digits(3)
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    a2 = grads['fc1.weight'].sum(1) / grads['fc1.bias'].sum(1, keepdim=True)
    G = grads['fc1.bias'] @ model.fc1.weight
    start = torch.rand_like(x)
    with layers.frozen(model), layers.frozen(generic):
        d_cnn, _ = search.feature_distance(model, start.clone().requires_grad_(True), a2, G,
                                           *search.conv_targets(model, grads))
        xs = start.clone().requires_grad_(True)
        d_any, _ = search.feature_distance(generic, xs, a2, G, *search.conv_targets(generic, grads))
        d_any.sum().backward()
    torch.testing.assert_close(d_any.detach(), d_cnn.detach(), atol=1e-5, rtol=1e-4)
    assert xs.grad is not None and xs.grad.abs().sum() > 0


def test_the_fedavg_simulation_of_any_model_is_sgd_on_each_client():
    """clients_logits via vmap(functional_call): two local steps equal plain SGD on each client's batch."""
    torch.manual_seed(2)
    model = create_model('lenet', MNIST_SPEC).eval()
    start = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.rand(2, 3, 1, 28, 28)
    y = torch.randint(0, 10, (2, 3))
    sim = fedavg_rounds.simulate_updates(model, start, x, y, 2, 0.1)
    for c in range(2):
        ref = create_model('lenet', MNIST_SPEC).eval()
        ref.load_state_dict(start, strict=False)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(ref(x[c]), y[c]).backward()
            opt.step()
        for k, v in ref.named_parameters():
            torch.testing.assert_close(sim[k][c].detach(), v.detach() - start[k], atol=1e-6, rtol=1e-4)


def test_the_closed_form_recovers_an_mlps_input_exactly():
    """In an MLP the first FC layer's input is the (normalised) image: the default method reads it off the
    gradient, whatever the unknown dropout mask; a batch whose rows separate is recovered too."""
    torch.manual_seed(3)
    model = create_model('mlp', MNIST_SPEC)
    x, y = digits(4, seed=5)
    for dropout in (False, True):
        grads = clients.client_gradients(model, x, y, 1, dropout=dropout)
        result = invert(model, grads, 'default', 1, iterations=20, progress=False)
        assert (psnr(result.images, x) > 50).all() and torch.equal(result.labels, y)
    grads = clients.client_gradients(model, x, y, 2, dropout=False)
    result = invert(model, grads, 'default', 2, iterations=20, progress=False)
    assert not result.failed.any()
    recon, _ = match_to_originals(result.images, result.labels, x, 2)  # order inside a batch is unknowable
    assert (psnr(recon, x) > 50).all()


def test_dlg_and_idlg_run_on_any_model():
    torch.manual_seed(4)
    model = create_model('lenet', RGB)
    x = torch.rand(2, *RGB.shape)
    y = torch.tensor([3, 7])
    grads = clients.client_gradients(model, x, y, 1, dropout=False)
    for method in ('dlg', 'idlg'):
        result = invert(model, grads, method, 1, iterations=2, progress=False)
        assert result.images.shape == x.shape and not result.failed.any()
    assert invert(model, grads, 'idlg', 1, iterations=2, progress=False).labels.tolist() == [3, 7]


TINY_ATTACKS = ['--gi-images', '2', '--gi-iterations', '10', '--gi-rounds-steps', '2', '--gi-map-steps', '2',
                '--mi-steps', '5', '--mi-restarts', '2', '--gmi-gan-steps', '20', '--gmi-steps', '5',
                '--gmi-restarts', '2', '--mia-shadows', '2', '--mia-candidates', '50', '--device', 'cpu',
                '--attacks', 'gradient,model,gan,membership']


@pytest.mark.parametrize('model', ['cnn', 'lenet'])
def test_the_whole_pipeline_on_3_channel_32x32_images(tmp_path, model):
    """main.py's training and every attack on a CIFAR-10-format fixture: figures, metrics, colour arrays."""
    data_dir = make_cifar_dir(tmp_path / 'cifar', n_train=300, n_test=200)
    history = train(tiny_config(data_dir, tmp_path / 'run', dataset='cifar10', model=model), log=lambda *a: None)
    assert history['dataset_spec']['shape'] == [3, 32, 32] and history['config']['model'] == model
    out = tmp_path / 'attack_results'
    run_all_attacks.main(['--model', str(tmp_path / 'run' / 'global_model.pth'), '--output-dir', str(out),
                          '--cache-dir', str(tmp_path / 'cache'), *TINY_ATTACKS])
    for name in ('gradient_inversion_idlg.png', 'model_inversion_all.png', 'gan_inversion_all.png',
                 'metrics.json', 'report.html'):
        assert os.path.getsize(out / name) > 0
    metrics = json.loads((out / 'metrics.json').read_text())
    assert {'gradient_inversion', 'model_inversion', 'gan_inversion', 'membership_inference'} <= set(metrics)
    arrays = np.load(out / 'reconstructions.npz')
    assert arrays['model_inversion/best_images'].shape == (10, 32, 32, 3)
    assert arrays['gan_inversion/best_images'].shape == (10, 32, 32, 3)
    assert arrays['gradient_inversion/originals'].shape == (2, 32, 32, 3)


def test_a_checkpoint_of_another_model_is_refused_with_the_mismatch_named(tmp_path, idx_dir):
    from src.attacks.target import load_attack_inputs
    from src.utils import UserError
    train(tiny_config(idx_dir, tmp_path / 'run', model='mlp'), log=lambda *a: None)
    path = tmp_path / 'run' / 'global_model.pth'
    state = torch.load(path, weights_only=True)  # a plain state dict that also says which model it is
    assert state._metadata['']['model'] == 'mlp' and create_model('mlp', MNIST_SPEC).load_state_dict(state)
    history = tmp_path / 'run' / 'training_history.json'
    h = json.loads(history.read_text())
    h['config']['model'] = 'lenet'
    history.write_text(json.dumps(h))
    with pytest.raises(UserError, match='holds a mlp, but its training history names the lenet'):
        load_attack_inputs(str(path), device='cpu')
    torch.save(dict(state), path)  # without the metadata (an older run's file): the shapes still tell
    with pytest.raises(UserError, match='is not the lenet its training history names'):
        load_attack_inputs(str(path), device='cpu')
    state._metadata = {'': 'not a dict'}  # malformed metadata names nothing: one line from the shapes, no traceback
    torch.save(state, path)
    with pytest.raises(UserError, match='is not the lenet its training history names'):
        load_attack_inputs(str(path), device='cpu')


def test_one_examples_gradient_is_the_batch_paths():
    """A single example (DLG, iDLG) takes plain autograd instead of vmap: the same numbers."""
    torch.manual_seed(5)
    model = create_model('lenet', RGB).eval()
    x, t = torch.rand(3, *RGB.shape), F.one_hot(torch.tensor([3, 1, 2]), 10).float()
    with layers.frozen(model):
        together = layers.per_example_grads(model, x, t)
        alone = [layers.per_example_grads(model, x[i:i + 1], t[i:i + 1]) for i in range(3)]
    for name, g in together.items():
        torch.testing.assert_close(g, torch.cat([a[name] for a in alone]), atol=1e-6, rtol=1e-5)
