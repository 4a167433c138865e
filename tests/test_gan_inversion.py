import argparse
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from src.attacks import gan_inversion as gi
from src.data import Dataset
from src.model import CNN
from src.utils import UserError, load_torch, save_torch
from tests.conftest import synthetic_digits


def tiny_images(n=64, seed=0):
    return synthetic_digits(n, seed)[0]


def nearest_distance(samples, data):
    return torch.cdist(samples.flatten(1), data.flatten(1)).min(1).values.mean().item()


def test_gan_training_learns_a_tiny_data_set():
    """The discriminator's loss drops below chance and the generator's samples move toward the data."""
    images = tiny_images(128)
    data = torch.from_numpy(images).float().div(255).unsqueeze(1)
    G0, _, _ = gi.train_gan(images, seed=0, steps=0, progress=False)  # the same initialisation, untrained
    G, D, history = gi.train_gan(images, seed=0, steps=80, batch_size=16, lr=1e-3, progress=False, log_every=20)
    assert history['step'] == [20, 40, 60, 80]
    assert history['d_loss'][-1] < 1.2  # log 4 = 1.386: a discriminator no better than chance
    z = torch.randn(64, gi.Z_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = G0(z), G(z)
    gap = lambda s: (s.mean(0) - data.mean(0)).pow(2).mean().item()  # noqa: E731
    assert gap(after) < 0.5 * gap(before)
    assert nearest_distance(after, data) < 0.8 * nearest_distance(before, data)


def sharp_random_cnn():
    """A random CNN whose logits actually vary with the input (default init gives near-uniform softmax)."""
    model = CNN().eval()
    with torch.no_grad():
        model.fc2.weight.mul_(30)
    return model


def test_latent_search_raises_the_target_confidence_and_keeps_z_in_range():
    torch.manual_seed(0)
    G, D, model = gi.Generator().eval(), gi.Discriminator().eval(), sharp_random_cnn()
    classes = list(range(10))
    _, conf0, _, _ = gi.invert(G, D, model, classes, restarts=2, steps=0, progress=False)
    for loss in ('ce', 'logit'):
        images, conf, z, _ = gi.invert(G, D, model, classes, restarts=2, steps=40, lr=0.02, loss=loss, progress=False)
        assert images.shape == (10, 2, 1, 28, 28) and conf.shape == (10, 2) and z.shape == (10, 2, gi.Z_DIM)
        assert conf.mean() > 1.5 * conf0.mean(), loss
        assert (conf > conf0).float().mean() >= 0.9
        assert z.abs().max() <= 1.0
    # the search leaves the networks as it found them
    assert all(p.requires_grad for p in model.parameters())


def test_batched_search_matches_one_latent_at_a_time():
    """All classes x restarts in one batch must give each latent exactly its own optimisation."""
    torch.manual_seed(0)
    G, D, model = gi.Generator().eval(), gi.Discriminator().eval(), sharp_random_cnn()
    batched, _, _, _ = gi.invert(G, D, model, [0, 1, 2], restarts=2, steps=5, precision='fp32', progress=False)
    gen = torch.Generator().manual_seed(gi.derive_seed(0, 'gmi', 'latents'))
    z0 = torch.randn(6, gi.Z_DIM, generator=gen).clamp_(-1, 1)
    for i, c in enumerate([0, 0, 1, 1, 2, 2]):
        single, _, _, _ = gi.invert(G, D, model, [c], restarts=1, steps=5, precision='fp32', progress=False,
                                    z0=z0[i:i + 1])
        torch.testing.assert_close(single[0, 0], batched[c, i % 2], atol=1e-4, rtol=1e-4)


def cached(tmp_path, images, seed=0, steps=3):
    return gi.load_or_train_gan(images, seed, steps, batch_size=16, precision='fp32', cache_dir=str(tmp_path),
                                progress=False)


def test_cache_is_reused_and_invalidated_when_its_key_changes(tmp_path):
    images = tiny_images()
    G1, _, info1 = cached(tmp_path, images)
    G2, _, info2 = cached(tmp_path, images)
    assert not info1['from_cache'] and info2['from_cache'] and info1['cache_path'] == info2['cache_path']
    for k, v in G1.state_dict().items():
        assert torch.equal(v, G2.state_dict()[k])
    assert not cached(tmp_path, images, seed=1)[2]['from_cache']
    assert not cached(tmp_path, images, steps=4)[2]['from_cache']
    other = images.copy()
    other[0, 0, 0] ^= 1  # one pixel of the public data differs
    assert not cached(tmp_path, other)[2]['from_cache']
    assert cached(tmp_path, images)[2]['from_cache']


def test_corrupt_cache_is_detected_and_retrained(tmp_path, capsys):
    images = tiny_images()
    G, _, info = cached(tmp_path, images)
    path = info['cache_path']
    reference = {k: v.clone() for k, v in G.state_dict().items()}

    with open(path, 'r+b') as f:  # garbage in the middle of the zip archive
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(256))
    G2, _, info2 = cached(tmp_path, images)
    captured = capsys.readouterr()
    assert not info2['from_cache'] and 'corrupt GAN cache' in captured.out + captured.err
    for k, v in reference.items():  # retraining from the same seed gives the same weights
        assert torch.equal(v, G2.state_dict()[k])
    load_torch(path)  # and the file is whole again

    saved = load_torch(path)  # a weight changed but the file still loads: the digest catches it
    saved['generator']['net.0.weight'] += 1
    save_torch(saved, path)
    assert not cached(tmp_path, images)[2]['from_cache']
    assert cached(tmp_path, images)[2]['from_cache']


def test_public_data_protocols():
    x, y = synthetic_digits(200, 0)
    data = Dataset('mnist', x, y, x[:100], y[:100])
    target = SimpleNamespace(data=data)
    images, protocol, attacked = gi.public_data(target, 'test')
    assert len(images) == 100 and attacked == list(range(10)) and protocol['name'] == 'test'
    images, protocol, attacked = gi.public_data(target, 'classes:5-9')
    assert attacked == [0, 1, 2, 3, 4] and len(images) == int(np.isin(y[:100], [5, 6, 7, 8, 9]).sum())
    assert gi.parse_classes('0-2,7') == [0, 1, 2, 7]
    for bad in ('classes:0-9', 'classes:x', 'mnist', 'train', 'classes:11'):
        with pytest.raises(UserError):
            gi.public_data(target, bad)


def test_flags_parse_and_bad_values_are_refused():
    parser = argparse.ArgumentParser()
    gi.add_arguments(parser)
    args = parser.parse_args(['--gmi-public', 'classes:5-9', '--gmi-loss', 'logit', '--gmi-restarts', '3'])
    assert args.gmi_public == 'classes:5-9' and args.gmi_loss == 'logit' and args.gmi_restarts == 3
    gi.check_args(args)
    with pytest.raises(UserError):
        gi.check_args(parser.parse_args(['--gmi-steps', '0']))


def test_run_writes_figures_and_honest_metrics(idx_dir, tmp_path):
    from src.attacks.target import load_target
    from src.federated import train
    from tests.conftest import tiny_config
    run_dir = tmp_path / 'run'
    train(tiny_config(idx_dir, run_dir), log=lambda *a: None)
    target = load_target(str(run_dir / 'global_model.pth'), device='cpu')
    parser = argparse.ArgumentParser()
    gi.add_arguments(parser)
    args = parser.parse_args(['--gmi-public', 'classes:5-9', '--gmi-gan-steps', '4', '--gmi-batch-size', '16',
                              '--gmi-steps', '3', '--gmi-restarts', '2'])
    args.seed, args.cache_dir = 0, str(tmp_path / 'cache')
    out = tmp_path / 'out'
    metrics, arrays = gi.run(target, args, str(out))
    assert (out / 'gan_inversion_all.png').is_file() and (out / 'gan_samples.png').is_file()
    assert metrics['attacked_classes'] == [0, 1, 2, 3, 4] and metrics['public_data']['name'] == 'class-disjoint'
    assert metrics['overall']['best_restart']['count'] == 5 and metrics['overall']['all_restarts']['count'] == 10
    assert 0 <= metrics['attack_accuracy'] <= 1 and metrics['knn_feature_distance'] > 0
    assert not metrics['gan_from_cache'] and 'threat_model' in metrics and metrics['seconds'] > 0
    assert arrays['best_images'].shape == (10, 28, 28) and arrays['all_restarts'].shape == (10, 2, 28, 28)
    json.dumps(metrics)  # JSON-able as it stands
    assert gi.run(target, args, str(out))[0]['gan_from_cache']


def test_diverged_latents_are_reported_failed_not_returned():
    import math

    import torch

    from src.attacks.gan_inversion import Discriminator, Generator, invert
    from src.model import CNN
    model = CNN()
    with torch.no_grad():
        model.fc2.bias.fill_(float('nan'))
    images, conf, _, log_conf = invert(Generator(), Discriminator(), model, [0, 1], restarts=2, steps=3,
                                       precision='fp32', progress=False)
    assert torch.isfinite(images).all() and (images == 0).all()
    assert (log_conf == -math.inf).all() and (conf == 0).all()
