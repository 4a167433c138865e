"""GAN-based model inversion (GMI): does it beat guessing, does the prior matter, and how fast is it?

On a global model trained with the 'standard' preset over real digits it
  1. times GAN training steps in plain fp32 against channels_last + bf16 autocast (what train_gan uses where
     the CPU has bf16), and the batched latent search (all classes x restarts in one batch) against the
     plain per-latent loop (one class, one restart at a time), checking both give the same images; each
     timing is the median and range of --repeats runs;
  2. runs the attack as run_all_attacks.py does (GanInversion().run, then .score) with
       default     the test split as the prior, this repository's search (logit loss)
       published   the same prior, GMI's published search (--gmi-search published: ce, lambda 100, lr 0.02
                   on the batch mean, 1,500 iterations)
       fashion     Fashion-MNIST's test split as the prior (cross-dataset; if --fashion-dir exists)
     each beside its no-attack baseline (the mean public image of each attacked class, scored alike) and,
     for the first two, the class-disjoint protocol (a GAN that saw classes 5-9 only, attacking 0-4);
     plus extra latent seeds on the default GAN (their search times give the search's median and range);
  3. runs the confidence-maximisation attack (src/attacks/model_inversion.py) on the same model and compares
     KNN distances to the private images: a generative prior should land much closer to real digits.
Scores come from two independent evaluation classifiers of different families (src/evaluation.py): an
inversion counts only when both read its class. Never the attacked model.

    python benchmarks/bench_gan_inversion.py --data-dir ../shared/data/mnist-10k [--run-dir RUN]

Without --run-dir it first trains the standard model into a temporary folder (about a minute). GANs are
trained fresh into a temporary cache unless --gan-cache-dir is given. Timings depend on what else runs on
the machine: run it alone.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import spread, standard_target  # noqa: E402
from src.attacks import gan_inversion as gi  # noqa: E402
from src.attacks import gan_prior as gp  # noqa: E402
from src.attacks import runner  # noqa: E402
from src.evaluation import load_evaluators  # noqa: E402
from src.utils import resolve_precision  # noqa: E402

TARGETS = {'best_restart': 0.95, 'all_restarts': 0.90, 'gan_seconds': 180.0, 'inversion_seconds': 30.0}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def gan_step_speed(images, steps, repeats):
    """Seconds per GAN training step, one value per repeat: plain fp32 vs channels_last + bf16 autocast."""
    x = torch.from_numpy(images[:64 * 8]).float().div(255).unsqueeze(1)
    out = {}
    for name, fmt, dtype in [('fp32', torch.contiguous_format, None),
                             ('channels_last+bf16', torch.channels_last, torch.bfloat16)]:
        torch.manual_seed(0)
        G, D = gp.Generator().to(memory_format=fmt), gp.Discriminator().to(memory_format=fmt)
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999)) for m in (G, D))
        real = x.contiguous(memory_format=fmt)

        def step(i):
            batch = real[(i % 8) * 64:(i % 8 + 1) * 64]
            with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                fake = G(torch.randn(64, gp.Z_DIM))
                d_real, d_fake = D(torch.cat([batch, fake.detach()])).float().split(64)
                d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            D.requires_grad_(False)
            with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                g_loss = F.softplus(-D(fake).float()).mean()
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
            D.requires_grad_(True)
        for i in range(3):
            step(i)
        out[name] = [timed(lambda: [step(i) for i in range(steps)])[1] / steps for _ in range(repeats)]
    return out


def search_speed(model, restarts, steps, repeats):
    """Per-latent loop vs one batch (fp32, same images) vs one batch at 'auto' precision (bf16 autocast where the
    CPU has it, as the attack runs): lists of seconds."""
    torch.manual_seed(0)
    G, D = gp.Generator().eval(), gp.Discriminator().eval()
    n = 10 * restarts
    gi.invert(G, D, model, [0], 1, 2, progress=False)  # warm-up
    z0 = torch.randn(n, gp.Z_DIM, generator=torch.Generator().manual_seed(gi.derive_seed(0, 'gmi', 'latents')))
    times = {'loop': [], 'batched fp32': [], 'batched auto': []}
    diff = 0.0
    for _ in range(repeats):
        (batched, *_), t = timed(lambda: gi.invert(G, D, model, list(range(10)), restarts, steps, precision='fp32',
                                                   progress=False))
        times['batched fp32'].append(t)
        singles, t = timed(lambda: [gi.invert(G, D, model, [i // restarts], 1, steps, precision='fp32',
                                              progress=False, z0=z0[i:i + 1])[0] for i in range(n)])
        times['loop'].append(t)
        diff = max(diff, (torch.cat(singles).view_as(batched) - batched).abs().max().item())
        times['batched auto'].append(timed(lambda: gi.invert(G, D, model, list(range(10)), restarts, steps,
                                                             precision='auto', progress=False))[1])
    return times, diff


def attack(view, private, ns, out_dir):
    """GanInversion as the runner calls it: run on the server's view, score against the clients' data."""
    a = gi.GanInversion()
    a.check(ns)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    report = a.score(a.run(view, ns), private, None, view, ns, out_dir)
    return dict(report.metrics, seconds=time.perf_counter() - t0)


def row(label, search, block, baseline, gan_seconds, cached, search_seconds):
    b, a = block['best_restart'], block['all_restarts']
    f = lambda v, s='.2f': '  n/a' if v is None else format(v, s)  # noqa: E731
    return (f"{label:<24} {search:<9} {f(b['attack_accuracy']):>5} {f(a['attack_accuracy']):>5} "
            f"{f(baseline['attack_accuracy']):>6} {f(b['attack_accuracy_primary']):>5} "
            f"{f(b['attack_accuracy_second']):>5} "
            f"{f(b['knn_feature_distance']):>6} {f(b['knn_pixel_distance']):>6} "
            f"{f(baseline['knn_feature_distance']):>6} {f(baseline['knn_pixel_distance']):>6} "
            f"{gan_seconds:6.0f}{'*' if cached else ' '} {search_seconds:7.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.environ.get('FL_REAL_DATA', '../shared/data')
    p.add_argument('--data-dir', default=os.path.join(root, 'mnist-10k'))
    p.add_argument('--fashion-dir', default=os.path.join(root, 'fashion-mnist'),
                   help='IDX folder of Fashion-MNIST for the cross-dataset prior (skipped if missing)')
    p.add_argument('--run-dir', help='folder with global_model.pth and training_history.json (default: train one)')
    p.add_argument('--cache-dir', default='cache', help='evaluation classifiers cache')
    p.add_argument('--gan-cache-dir', help='reuse GANs cached here (default: train them fresh, timed)')
    p.add_argument('--out-dir', default=None, help='where to write the figures (default: a temporary folder)')
    p.add_argument('--seeds', default='0,1,2', help='latent-search seeds on the default GAN')
    p.add_argument('--repeats', type=int, default=3, help='runs per speed measurement (median and range)')
    p.add_argument('--loop-steps', type=int, default=20, help='search steps for the batched-vs-loop timing')
    p.add_argument('--skip-loops', action='store_true', help='no speed baselines')
    p.add_argument('--skip-published', action='store_true', help="no run of GMI's published search")
    p.add_argument('--skip-mi', action='store_true', help='do not run the confidence-maximisation attack')
    gi.GanInversion().add_arguments(p)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(',')]

    with tempfile.TemporaryDirectory() as tmp:
        gan_cache = args.gan_cache_dir or os.path.join(tmp, 'gan_cache')
        view, private, run_dir = standard_target(args.data_dir, args.run_dir, os.path.join(tmp, 'run'), gan_cache)
        print(f"target: {run_dir}/global_model.pth, test accuracy {view.training['final_test_accuracy']:.4f}; "
              f'torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}')
        evaluators = load_evaluators(private.dataset, 0, args.cache_dir, view.device)
        for kind, info in evaluators.info.items():
            print(f"{kind} evaluator ({info.get('family', info.get('arch', '?'))}): test accuracy "
                  f"{info['test_accuracy']:.4f} ({'cached' if info['from_cache'] else 'just trained'})")
            # the attack's score() reads its evaluators from view.cache_dir, here the GAN cache: the same files
            if os.path.abspath(os.path.dirname(info['cache_path'])) != os.path.abspath(gan_cache):
                os.makedirs(gan_cache, exist_ok=True)
                shutil.copy2(info['cache_path'], gan_cache)
        out_dir = args.out_dir or os.path.join(tmp, 'figures')
        base_ns = {**vars(args), 'seed': 0, 'cache_dir': gan_cache}
        checks = []

        # 1. speed of the building blocks, each against its plain baseline, measured here
        if not args.skip_loops:
            speed = gan_step_speed(view.public_x.mul(255).round().byte().numpy()[:, 0], 30, args.repeats)
            ratio = [a / b for a, b in zip(speed['fp32'], speed['channels_last+bf16'])]
            print(f"\nGAN training step (batch 64): fp32 {spread([v * 1e3 for v in speed['fp32']], 'ms', 1)}, channels_last+bf16 "
                  f"{spread([v * 1e3 for v in speed['channels_last+bf16']], 'ms', 1)} -> {spread(ratio, 'x', digits=1)}")
            R = args.gmi_restarts
            times, diff = search_speed(view.model, R, args.loop_steps, args.repeats)
            print(f"latent search, {10 * R} latents x {args.loop_steps} steps: "
                  f"per-latent loop {spread(times['loop'])}; "
                  f"batched fp32 {spread(times['batched fp32'])} -> "
                  f"{spread([a / b for a, b in zip(times['loop'], times['batched fp32'])], 'x', digits=1)} "
                  f"(same images: max |diff| {diff:.1e}); batched {resolve_precision('auto', view.device)} "
                  f"{spread(times['batched auto'])} -> "
                  f"{spread([a / b for a, b in zip(times['batched fp32'], times['batched auto'])], 'x', digits=1)} "
                  'more')

        # 2. the attack as run_all_attacks.py runs it
        runs = [('default', {'gmi_public': 'test', 'gmi_search': 'default', 'gmi_class_disjoint': True})]
        if not args.skip_published:  # GMI's own search fixes these four: they must be unset
            runs.append(('published', {'gmi_public': 'test', 'gmi_search': 'published', 'gmi_class_disjoint': True,
                                       'gmi_lr': None, 'gmi_steps': None, 'gmi_lambda': None, 'gmi_loss': None}))
        if os.path.isdir(args.fashion_dir):
            runs.append(('fashion', {'gmi_public': 'fashion-mnist', 'gmi_public_dir': args.fashion_dir,
                                     'gmi_search': 'default', 'gmi_class_disjoint': False}))
        else:
            print(f'(no {args.fashion_dir}: cross-dataset prior skipped)')
        results = {}
        for name, overrides in runs:
            print(f'\n-- {name} ...', flush=True)
            results[name] = attack(view, private, argparse.Namespace(**{**base_ns, **overrides}),
                                   os.path.join(out_dir, name))
            print(results[name]['summary'])

        print(f"\n{'prior (attacked)':<24} {'search':<9} {'best':>5} {'all':>5} {'no-att':>6} {'prim':>5} {'2nd':>5} "
              f"{'KNN f':>6} {'KNN p':>6} {'base f':>6} {'base p':>6} {'GAN s':>7} {'search':>7}")
        for name, m in results.items():
            prior = m['public_data']['name'] + ' (all)'
            print(row(prior, m['settings']['search'], m['overall'], m['no_attack_baseline'], m['gan_train_seconds'],
                      m['gan_from_cache'], m['inversion_seconds']))
            cd = m['class_disjoint']
            if 'best_restart' in cd and cd['best_restart'].get('count'):
                print(row('class-disjoint 5-9 (0-4)', m['settings']['search'], cd, cd['no_attack_baseline'],
                          cd['gan_train_seconds'], cd['gan_from_cache'], cd['inversion_seconds']))
        print('best = both evaluators read the class, for the restart per class the target is most confident about '
              "(GMI's protocol); all = every restart (later papers'); no-att = the same for each attacked class's mean "
              'public image (no attack); prim / 2nd = best restart by each evaluator alone; KNN f / p = distance to '
              'the nearest private image of the class in the primary evaluator\'s features / in pixels (base: the '
              'no-attack images); * = GAN from cache (time of its original training); search: one run each')

        # extra latent seeds on the default GAN: is the default's accuracy luck? (and the search's speed)
        default = results['default']
        ns = argparse.Namespace(**{**base_ns, 'gmi_public': 'test', 'gmi_search': 'default'})
        search = gi.search_settings(ns)
        public = gi.public_data(view, 'test')
        G, D, gan = gp.load_or_train_gan(public['images'], 0, args.gmi_gan_steps, args.gmi_batch_size,
                                         args.gmi_gan_lr, args.gmi_precision, view.device, gan_cache)
        px, py = private.clients()
        per_seed, seed_seconds = [], []
        for seed in seeds:
            (images, conf, _, log_conf), t = timed(lambda: gi.invert(
                G, D, view.model, list(range(10)), args.gmi_restarts, search['steps'], search['lr'], search['lambda'],
                search['loss'], seed, precision=args.gmi_precision, progress=False))
            seed_seconds.append(t)
            run = dict(public=public, attacked=public['attacked'], classes=list(range(10)), images=images, conf=conf,
                       log_conf=log_conf)
            s = gi.score_run(run, evaluators, px, py, view.model)['overall']
            per_seed.append((s['best_restart']['attack_accuracy'], s['all_restarts']['attack_accuracy']))
            print(f'  latent seed {seed}: best restart {per_seed[-1][0]:.2f}, all restarts {per_seed[-1][1]:.2f} '
                  f'({t:.1f} s)')
        print(f"default search, 10 classes x {args.gmi_restarts} restarts x {search['steps']} steps: "
              f'{spread(seed_seconds)}')

        # 3. the confidence-maximisation attack on the same model
        mi_metrics = None
        if not args.skip_mi:
            mi = runner.get('model')
            mp = argparse.ArgumentParser()
            mi.add_arguments(mp)
            mns = argparse.Namespace(**vars(mp.parse_args([])), seed=0, cache_dir=args.cache_dir, device='cpu')
            os.makedirs(os.path.join(out_dir, 'model_inversion'), exist_ok=True)
            mi_metrics = mi.score(mi.run(view, mns), private, None, view, mns, os.path.join(out_dir, 'model_inversion'))
            mi_metrics = mi_metrics.metrics['overall']['best_restart']
            print(f"\nconfidence maximisation (model_inversion.py, defaults): attack accuracy "
                  f"{mi_metrics['attack_accuracy']:.2f}, KNN distance feature {mi_metrics['knn_feature_distance']:.2f} "
                  f"pixel {mi_metrics['knn_pixel_distance']:.2f}; GMI (default prior): feature "
                  f"{default['knn_feature_distance']:.2f} pixel {default['knn_pixel_distance']:.2f}")

        b, a = default['overall']['best_restart'], default['overall']['all_restarts']
        cd = default['class_disjoint']
        checks += [
            (f"best-restart attack accuracy {b['attack_accuracy']:.2f} (latent seeds: "
             f"{', '.join(f'{x:.2f}' for x, _ in per_seed)}) >= {TARGETS['best_restart']}",
             min([b['attack_accuracy']] + [x for x, _ in per_seed]) >= TARGETS['best_restart']),
            (f"all-restart attack accuracy {a['attack_accuracy']:.2f} (latent seeds: "
             f"{', '.join(f'{y:.2f}' for _, y in per_seed)}) >= {TARGETS['all_restarts']}",
             min([a['attack_accuracy']] + [y for _, y in per_seed]) >= TARGETS['all_restarts']),
            (f"KNN feature distance {b['knn_feature_distance']:.2f} below the no-attack class means' "
             f"{default['no_attack_baseline']['knn_feature_distance']:.2f}",
             b['knn_feature_distance'] < default['no_attack_baseline']['knn_feature_distance']),
            (f"class-disjoint (0-4): attack accuracy {cd['best_restart']['attack_accuracy']:.2f} above no attack's "
             f"{cd['no_attack_baseline']['attack_accuracy']:.2f}",
             cd['best_restart']['attack_accuracy'] > cd['no_attack_baseline']['attack_accuracy']),
            (f"GAN training {default['gan_train_seconds']:.0f} s{' (cached)' if default['gan_from_cache'] else ''} "
             f"<= {TARGETS['gan_seconds']:.0f} s", default['gan_train_seconds'] <= TARGETS['gan_seconds']),
            (f"search of 10 classes x {args.gmi_restarts} restarts, median {statistics.median(seed_seconds):.1f} s <= "
             f"{TARGETS['inversion_seconds']:.0f} s", statistics.median(seed_seconds) <= TARGETS['inversion_seconds'])]
        if 'fashion' in results:
            m = results['fashion']
            checks.append((f"GAN training on {m['public_data']['num_images']} fashion images "
                           f"{m['gan_train_seconds']:.0f} s <= {TARGETS['gan_seconds']:.0f} s",
                           m['gan_train_seconds'] <= TARGETS['gan_seconds']))
        if mi_metrics is not None:
            checks += [(f"KNN feature distance {b['knn_feature_distance']:.2f} < confidence maximisation's "
                        f"{mi_metrics['knn_feature_distance']:.2f}",
                        b['knn_feature_distance'] < mi_metrics['knn_feature_distance']),
                       (f"KNN pixel distance {b['knn_pixel_distance']:.2f} < confidence maximisation's "
                        f"{mi_metrics['knn_pixel_distance']:.2f}",
                        b['knn_pixel_distance'] < mi_metrics['knn_pixel_distance'])]
        print()
        for text, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
        if args.out_dir:
            print(f'figures in {args.out_dir}')


if __name__ == '__main__':
    main()
