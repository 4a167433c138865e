import argparse
import dataclasses
import functools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.attacks import gan_inversion as gi
from src.attacks import gan_prior as gp
from src.attacks import runner
from src.attacks.base import AttackerView, PrivateData
from src.data import Dataset, to_tensor
from src.model import CNN
from src.utils import UserError, load_torch, save_torch, state_digest
from tests.conftest import synthetic_digits

TINY = ['--gmi-gan-steps', '4', '--gmi-batch-size', '16', '--gmi-steps', '3', '--gmi-restarts', '2',
        '--gmi-precision', 'fp32']


def tiny_images(n=64, seed=0):
    return synthetic_digits(n, seed)[0]


def nearest_distance(samples, data):
    return torch.cdist(samples.flatten(1), data.flatten(1)).min(1).values.mean().item()


def sharp_random_cnn():
    """A random CNN whose logits actually vary with the input (default init gives near-uniform softmax)."""
    model = CNN().eval()
    with torch.no_grad():
        model.fc2.weight.mul_(30)
    return model


def make_view(cache_dir, n_public=120):
    """The server's view, built directly: a model, public data, and no field for any client's data."""
    x, y = synthetic_digits(n_public, 1)
    torch.manual_seed(0)
    return AttackerView(model=sharp_random_cnn(), training={'config': {'dataset': 'mnist'}}, captured=None,
                        public_x=to_tensor(x), public_y=torch.from_numpy(y.astype(np.int64)), dataset='mnist',
                        device=torch.device('cpu'), cache_dir=str(cache_dir))


def make_private(view):
    x, y = synthetic_digits(200, 2)
    test_x = (view.public_x[:, 0] * 255).round().to(torch.uint8).numpy()
    data = Dataset('mnist', x, y, test_x, view.public_y.numpy().astype(np.uint8))
    return PrivateData(train_x=to_tensor(x), train_y=torch.from_numpy(y.astype(np.int64)),
                       client_indices=[np.arange(0, 100), np.arange(100, 200)], dataset=data)


def settings(*argv):
    parser = argparse.ArgumentParser()
    gi.GanInversion().add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.seed = 0
    return args


# ---------------------------------------------------------------------------------------------- the prior

def test_gan_training_learns_a_tiny_data_set():
    """The discriminator's loss drops below chance and the generator's samples move toward the data. 240 steps:
    at 80 the samples' mean had moved only to 0.72 of its distance on an AMD EPYC host (under 0.5 on the Intel one
    this was written on); at 240, 0.03-0.05 and nearest distances 0.43-0.51 for training seeds 0-3 there."""
    images = tiny_images(128)
    data = torch.from_numpy(images).float().div(255).unsqueeze(1)
    G0, _, _ = gp.train_gan(images, seed=0, steps=0, progress=False)  # the same initialisation, untrained
    G, D, history = gp.train_gan(images, seed=0, steps=240, batch_size=16, lr=1e-3, progress=False, log_every=60)
    assert history['step'] == [60, 120, 180, 240]
    assert history['d_loss'][-1] < 1.2  # log 4 = 1.386: a discriminator no better than chance
    z = torch.randn(64, gp.Z_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = G0(z), G(z)
    gap = lambda s: (s.mean(0) - data.mean(0)).pow(2).mean().item()  # noqa: E731
    assert gap(after) < 0.5 * gap(before)
    assert nearest_distance(after, data) < 0.8 * nearest_distance(before, data)


def test_restart_undoes_training_as_the_cuda_graph_warm_up_needs():
    """A CUDA graph's capture needs warm-up steps; restart undoes them in place (weights, batch-norm statistics,
    Adam's state), so the training that follows equals training from scratch. Checked here on the CPU, with
    the same Adam and networks the graph path uses; bench_cuda_graphs.py compares the graph itself on a GPU."""
    z = torch.randn(8, gp.Z_DIM, generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(0)
        G = gp.Generator().train()
        return G, torch.optim.Adam(G.parameters(), lr=1e-2, betas=(0.5, 0.999))

    def train(G, opt, steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            G(z).square().mean().backward()
            opt.step()

    G, opt = fresh()
    saved = [t.clone() for t in G.state_dict().values()]
    train(G, opt, 3)  # the warm-up
    assert not torch.equal(G.state_dict()['net.1.running_mean'], saved[1])
    gp.restart([G], [opt], saved)
    train(G, opt, 4)
    G_ref, opt_ref = fresh()
    train(G_ref, opt_ref, 4)
    for k, v in G_ref.state_dict().items():
        assert torch.equal(G.state_dict()[k], v), k


def cached(tmp_path, images, seed=0, steps=3):
    return gp.load_or_train_gan(images, seed, steps, batch_size=16, precision='fp32', cache_dir=str(tmp_path),
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


def test_corrupt_cache_is_retrained_with_a_note_never_an_exception(tmp_path, capsys):
    images = tiny_images()
    G, _, info = cached(tmp_path, images)
    path = info['cache_path']
    reference = {k: v.clone() for k, v in G.state_dict().items()}
    good = load_torch(path)

    with open(path, 'r+b') as f:  # garbage in the middle of the zip archive
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(256))
    G2, _, info2 = cached(tmp_path, images)
    assert not info2['from_cache'] and 'corrupt GAN cache' in ''.join(capsys.readouterr())
    for k, v in reference.items():  # retraining from the same seed gives the same weights
        assert torch.equal(v, G2.state_dict()[k])

    def tampered(change):
        saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        change(saved)
        return saved

    def double_with_digest(s):  # load_state_dict would cast it silently: only the dtype check catches it
        s['generator']['net.0.weight'] = s['generator']['net.0.weight'].double()
        s['weights_sha256'] = state_digest(s['generator'], s['discriminator'])

    cases = {
        'a weight changed, the file still loads': lambda s: s['generator'].update(
            {'net.0.weight': s['generator']['net.0.weight'] + 1}),
        'a string for a weight': lambda s: s['generator'].update({'net.0.weight': 'weights'}),
        'a list for a weight': lambda s: s['discriminator'].update({'net.0.bias': [0.0] * 64}),
        'a number for a buffer': lambda s: s['generator'].update({'net.1.num_batches_tracked': 3}),
        'a tensor of another dtype': lambda s: s['generator'].update(
            {'net.0.weight': s['generator']['net.0.weight'].double()}),
        'a missing weight': lambda s: s['discriminator'].pop('net.0.bias'),
        'another dtype, digest recomputed to match': double_with_digest,
        'a list for the state dict': lambda s: s.update(generator=list(s['generator'].values())),
        'a malformed history': lambda s: s.update(history={'d_loss': 'low'}),
        'a string for the training time': lambda s: s.update(train_seconds='fast'),
    }
    for name, change in cases.items():
        save_torch(tampered(change), path)
        G3, _, info3 = cached(tmp_path, images)  # must not raise
        assert not info3['from_cache'], name
        assert 'corrupt GAN cache' in ''.join(capsys.readouterr()), name
        for k, v in reference.items():
            assert torch.equal(v, G3.state_dict()[k]), name
    save_torch([1, 2, 3], path)  # not even a dict
    assert not cached(tmp_path, images)[2]['from_cache']
    assert cached(tmp_path, images)[2]['from_cache']  # and the file is whole again


# ---------------------------------------------------------------------------------------------- the search

def test_latent_search_raises_the_target_confidence_and_keeps_z_in_range():
    torch.manual_seed(0)
    G, D, model = gp.Generator().eval(), gp.Discriminator().eval(), sharp_random_cnn()
    classes = list(range(10))
    _, conf0, _, _ = gi.invert(G, D, model, classes, restarts=2, steps=0, progress=False)
    for loss in ('ce', 'logit'):
        images, conf, z, _ = gi.invert(G, D, model, classes, restarts=2, steps=40, lr=0.02, loss=loss, progress=False)
        assert images.shape == (10, 2, 1, 28, 28) and conf.shape == (10, 2) and z.shape == (10, 2, gp.Z_DIM)
        assert conf.mean() > 1.5 * conf0.mean(), loss
        assert (conf > conf0).float().mean() >= 0.9
        assert z.abs().max() <= 1.0
    assert all(p.requires_grad for p in model.parameters())  # the search leaves the networks as it found them


def test_batched_search_matches_one_latent_at_a_time():
    """All classes x restarts in one batch must give each latent exactly its own optimisation."""
    torch.manual_seed(0)
    G, D, model = gp.Generator().eval(), gp.Discriminator().eval(), sharp_random_cnn()
    batched, _, _, _ = gi.invert(G, D, model, [0, 1, 2], restarts=2, steps=5, precision='fp32', progress=False)
    gen = torch.Generator().manual_seed(gi.derive_seed(0, 'gmi', 'latents'))
    z0 = torch.randn(6, gp.Z_DIM, generator=gen).clamp_(-1, 1)
    for i, c in enumerate([0, 0, 1, 1, 2, 2]):
        single, _, _, _ = gi.invert(G, D, model, [c], restarts=1, steps=5, precision='fp32', progress=False,
                                    z0=z0[i:i + 1])
        torch.testing.assert_close(single[0, 0], batched[c, i % 2], atol=1e-4, rtol=1e-4)


def test_diverged_latents_are_reported_failed_not_returned():
    model = CNN()
    with torch.no_grad():
        model.fc2.bias.fill_(float('nan'))
    images, conf, _, log_conf = gi.invert(gp.Generator(), gp.Discriminator(), model, [0, 1], restarts=2, steps=3,
                                          precision='fp32', progress=False)
    assert torch.isfinite(images).all() and (images == 0).all()
    assert (log_conf == -math.inf).all() and (conf == 0).all()


# ---------------------------------------------------------------------------------------------- settings

def test_flags_parse_and_bad_values_are_refused():
    attack = gi.GanInversion()
    args = settings('--gmi-public', 'classes:5-9', '--gmi-loss', 'logit', '--gmi-restarts', '3')
    assert args.gmi_public == 'classes:5-9' and args.gmi_restarts == 3 and args.gmi_class_disjoint
    attack.check(args)
    assert not settings('--no-gmi-class-disjoint').gmi_class_disjoint
    for bad in (['--gmi-steps', '0'], ['--gmi-lr', '-1'], ['--gmi-lambda', '-1'], ['--gmi-public', 'classes:x'],
                ['--gmi-public', 'train']):
        with pytest.raises(UserError):
            attack.check(settings(*bad))


def test_published_search_fixes_gmis_values_and_refuses_overrides():
    attack = gi.GanInversion()
    published = settings('--gmi-search', 'published')
    attack.check(published)
    s = gi.search_settings(published)
    assert (s['lr'], s['steps'], s['lambda'], s['loss'], s['reduction']) == (0.02, 1500, 100.0, 'ce', 'mean')
    default = gi.search_settings(settings())
    assert (default['lr'], default['steps'], default['lambda'], default['loss']) == (0.002, 600, 10.0, 'logit')
    assert gi.search_settings(settings('--gmi-loss', 'ce'))['lambda'] == 100.0
    assert gi.search_settings(settings('--gmi-lr', '0.05'))['lr'] == 0.05  # flags do override the default search
    for flag, value in (('--gmi-lr', '0.1'), ('--gmi-steps', '10'), ('--gmi-lambda', '1'), ('--gmi-loss', 'ce')):
        with pytest.raises(UserError, match=flag):
            attack.check(settings('--gmi-search', 'published', flag, value))


def test_public_data_protocols(tmp_path):
    view = make_view(tmp_path)
    y = view.public_y.numpy()
    p = gi.public_data(view, 'test')
    assert len(p['images']) == len(y) and p['attacked'] == list(range(10)) and p['protocol']['name'] == 'test'
    assert np.array_equal(p['images'], (view.public_x[:, 0] * 255).round().to(torch.uint8).numpy())
    p = gi.public_data(view, 'classes:5-9')
    assert p['attacked'] == [0, 1, 2, 3, 4] and len(p['images']) == int(np.isin(y, [5, 6, 7, 8, 9]).sum())
    assert gi.parse_classes('0-2,7') == [0, 1, 2, 7]
    for bad in ('classes:0-9', 'classes:x', 'mnist', 'train', 'classes:11'):
        with pytest.raises(UserError):
            gi.public_data(view, bad)
    # a class list impossible for the data is refused once it is loaded, before any attack runs
    attack = gi.GanInversion()
    attack.check_data(settings('--gmi-public', 'classes:5-9'), view)
    for bad in ('classes:0-9', 'classes:11'):
        attack.check(settings('--gmi-public', bad))  # the flag alone cannot tell: the classes are the data's
        with pytest.raises(UserError, match='within 0-9'):
            attack.check_data(settings('--gmi-public', bad), view)


# ---------------------------------------------------------------------------------------------- run and score

@pytest.fixture
def spy_training(monkeypatch):
    """Every image set a GAN is trained on, in order."""
    seen, real = [], gp.train_gan

    def spy(images, *args, **kwargs):
        seen.append(np.array(images))
        return real(images, *args, **kwargs)
    monkeypatch.setattr(gp, 'train_gan', spy)
    return seen


def test_run_from_a_view_alone_and_the_class_disjoint_gan_never_sees_0_to_4(tmp_path, spy_training):
    view = make_view(tmp_path / 'cache')
    assert not {f.name for f in dataclasses.fields(AttackerView)} & {'train_x', 'train_y', 'client_indices', 'private'}
    result = gi.GanInversion().run(view, settings(*TINY))
    main, disjoint = result['main'], result['class_disjoint']
    assert main['images'].shape == (10, 2, 1, 28, 28) and main['conf'].shape == (10, 2)
    assert disjoint['images'].shape == (10, 2, 1, 28, 28) and disjoint['attacked'] == [0, 1, 2, 3, 4]

    label_of = {img.tobytes(): int(c) for img, c in zip(gi.public_data(view)['images'], view.public_y.numpy())}
    assert len(spy_training) == 2
    first, second = ([label_of[img.tobytes()] for img in images] for images in spy_training)
    assert sorted(first) == sorted(view.public_y.tolist())  # the default prior: the whole public split
    assert second and set(second) <= {5, 6, 7, 8, 9}  # the class-disjoint GAN: none of 0-4, ever
    assert len(second) == int((view.public_y >= 5).sum())

    # --gmi-public classes:... is class-disjoint already: that run is reused, not trained twice
    spy_training.clear()
    result = gi.GanInversion().run(view, settings(*TINY, '--gmi-public', 'classes:5-9'))
    assert result['class_disjoint'] == 'main' and len(spy_training) == 0  # its GAN is the cached one above
    assert gi.GanInversion().run(view, settings(*TINY, '--no-gmi-class-disjoint'))['class_disjoint'] is None


def test_published_search_runs_with_gmis_values(tmp_path, monkeypatch):
    """Spy on descend: lr 0.02, 1500 steps, Nesterov SGD in [-1, 1], and the objective GMI minimises
    (-D(G(z)) + 100 * cross-entropy, averaged over one latent per attacked class). Then 2 steps only."""
    calls, real = [], gi.descend

    def spy(x, loss_fn, steps, lr, **kw):
        calls.append(dict(x=x.clone(), loss=loss_fn(x, 0).detach(), steps=steps, lr=lr, **kw))
        return real(x, loss_fn, 2, lr, **kw)
    monkeypatch.setattr(gi, 'descend', spy)
    view = make_view(tmp_path)
    args = settings(*TINY[:4], '--gmi-restarts', '2', '--gmi-precision', 'fp32', '--gmi-search', 'published')
    result = gi.GanInversion().run(view, args)
    assert len(calls) == 2  # the chosen prior and the class-disjoint one
    for call, run in zip(calls, (result['main'], result['class_disjoint'])):
        assert (call['steps'], call['lr'], call['optimizer'], call['bounds']) == (1500, 0.02, 'sgd-nesterov', (-1, 1))
        spec = 'test' if run is result['main'] else 'classes:5-9'
        G, D, _ = gp.load_or_train_gan(gi.public_data(view, spec)['images'], 0, 4, 16, 2e-4, 'fp32', 'cpu',
                                       view.cache_dir, progress=False)
        z, target = call['x'], torch.arange(10).repeat_interleave(2)
        assert z.abs().max() > 1  # GMI clamps z after each step, not its N(0, I) start
        with torch.no_grad():
            fake = G(z)
            ce = F.cross_entropy(view.model(fake), target, reduction='none')
            expected = (-D(fake) + 100 * ce) / len(run['attacked'])
        torch.testing.assert_close(call['loss'], expected, atol=1e-4, rtol=1e-4)
    assert result['search']['search'] == 'published'


def run_and_score(tmp, *argv):
    """run then score, as the runner does. Both evaluators train once per cache folder, one epoch on 200
    synthetic digits: these tests check what is scored and how, not how well."""
    import src.evaluation as ev
    view = make_view(tmp / 'cache')
    private, attack, args = make_private(view), gi.GanInversion(), settings(*TINY, *argv)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, 'load_evaluators', functools.partial(ev.load_evaluators, epochs=1))
        report = attack.score(attack.run(view, args), private, None, view, args, str(tmp))
    return view, report, tmp, private


@pytest.fixture(scope='module')
def scored(tmp_path_factory):
    return run_and_score(tmp_path_factory.mktemp('gmi'))


def test_score_reports_honest_metrics_with_the_no_attack_baseline(scored):
    view, report, out, private = scored
    m, arrays = report.metrics, report.arrays
    assert (out / 'gan_inversion_all.png').is_file() and (out / 'gan_samples.png').is_file()
    json.dumps(m)  # JSON-able as it stands
    for key in ('attack_accuracy', 'attack_accuracy_all_restarts', 'eval_confidence', 'knn_feature_distance',
                'knn_pixel_distance', 'public_data', 'attacked_classes', 'overall', 'per_class', 'gan_train_seconds',
                'gan_from_cache', 'inversion_seconds', 'n_failed', 'gan', 'settings', 'eval_classifier', 'seed',
                'threat_model', 'summary', 'evaluators', 'no_attack_baseline', 'class_disjoint'):
        assert key in m, key
    assert set(m['evaluators']) == {'primary', 'second'} and m['settings']['search'] == 'default'
    assert m['overall']['best_restart']['count'] == 10 and m['overall']['all_restarts']['count'] == 20

    # the baseline: each class's mean public image, scored like the inversions, accuracy a fraction
    base = m['no_attack_baseline']
    assert base['count'] == 10 and 0 <= base['attack_accuracy'] <= 1 and 0 <= base['target_confidence'] <= 1
    means = np.stack([view.public_x[view.public_y == c].mean(0)[0].numpy() for c in range(10)])
    np.testing.assert_allclose(arrays['no_attack_baseline'], means, atol=1e-6)
    assert 'no attack' in m['summary'] and f"{base['attack_accuracy']:.3f}" in m['summary']
    px, py = private.clients()  # and its scores are those images' own: nearest private image of the class
    knn = [torch.cdist(torch.from_numpy(means[c]).view(1, -1), px[py == c].flatten(1)).min().item() for c in range(10)]
    assert base['knn_pixel_distance'] == pytest.approx(np.mean(knn), rel=1e-4)

    cd = m['class_disjoint']
    assert cd['attacked_classes'] == [0, 1, 2, 3, 4] and cd['public_classes'] == [5, 6, 7, 8, 9]
    assert cd['best_restart']['count'] == 5 and cd['all_restarts']['count'] == 10
    assert cd['no_attack_baseline']['count'] == 5 and 0 <= cd['no_attack_baseline']['attack_accuracy'] <= 1
    # with only 5-9 public, the server's best guess for any of 0-4 is the mean of all its 5-9 images
    rest = view.public_x[view.public_y >= 5].mean(0)[0].numpy()
    np.testing.assert_allclose(arrays['class_disjoint_no_attack_baseline'], np.stack([rest] * 5), atol=1e-6)
    assert (f"class-disjoint (GAN saw 5-9, attacks 0-4): {cd['best_restart']['attack_accuracy']:.3f} vs "
            f"{cd['no_attack_baseline']['attack_accuracy']:.3f} with no attack") in m['summary']
    for path, label, kind in gi.GanInversion.headline:  # every declared headline number is there
        value = m
        for part in path.split('.'):
            value = value[part]
        assert isinstance(value, float), path
        assert kind != 'fraction' or 0 <= value <= 1, path
    assert arrays['best_images'].shape == (10, 28, 28) and arrays['all_restarts'].shape == (10, 2, 28, 28)


def test_metrics_match_the_declared_schema(scored):
    jsonschema = pytest.importorskip('jsonschema')
    report = scored[1]
    schema = runner.metrics_schema()['properties']['gan_inversion']
    jsonschema.validate(dict(report.metrics, seconds=1.0), schema)


def test_class_disjoint_prior_is_its_own_class_disjoint_run(scored):
    """--gmi-public classes:5-9 reports that run under class_disjoint too, with the same numbers."""
    _, report, tmp, _ = run_and_score(scored[2], '--gmi-public', 'classes:5-9')
    m = report.metrics
    assert m['class_disjoint']['reused_main_run'] and m['attacked_classes'] == [0, 1, 2, 3, 4]
    assert m['class_disjoint']['best_restart'] == m['overall']['best_restart']
    assert m['class_disjoint']['no_attack_baseline'] == m['no_attack_baseline']
    # the same GAN (cached, same public data) and latents as the default run's class-disjoint block
    assert m['class_disjoint']['best_restart'] == scored[1].metrics['class_disjoint']['best_restart']
