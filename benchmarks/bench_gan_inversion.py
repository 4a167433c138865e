"""GAN-based model inversion (GMI): does it work, does the prior matter, and how fast is it?

On a global model trained with the 'standard' preset over real digits it
  1. times GAN training steps in plain fp32 against channels_last + bf16 autocast (what train_gan uses where
     the CPU has bf16), and the batched latent search (all classes x restarts in one batch) against the
     plain per-latent loop (one class, one restart at a time), checking both give the same images;
  2. runs the attack as run_all_attacks.py does (gan_inversion.run) with each public-data protocol:
       test          the dataset's test split (default)
       classes:5-9   class-disjoint: the GAN sees digits 5-9 only; the attack targets 0-4
       fashion-mnist cross-dataset: Fashion-MNIST's test split as the prior (if --fashion-dir exists)
     and with both identity losses (logit: the default; ce: GMI's original) on the default prior, plus
     extra latent seeds on the same GAN;
  3. runs the confidence-maximisation attack (src/attacks/model_inversion.py) on the same model and compares
     KNN distances to the private images: a generative prior should land much closer to real digits.
Scores come from the independent evaluation classifier (src/evaluation.py), never the attacked model.

    python benchmarks/bench_gan_inversion.py --data-dir ../shared/data/mnist-10k [--run-dir RUN]

Without --run-dir it first trains the standard model into a temporary folder (about a minute). GANs are
trained fresh into a temporary cache unless --gan-cache-dir is given. Timings depend on what else runs on
the machine: run it alone.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.attacks import gan_inversion as gi  # noqa: E402
from common import standard_target  # noqa: E402
from src.evaluation import load_or_train_eval_classifier, private_data, score_inversions  # noqa: E402

TARGETS = {'best_restart': 0.95, 'all_restarts': 0.90, 'gan_seconds': 180.0, 'inversion_seconds': 30.0}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def gan_step_speed(images, steps=30):
    """Seconds per GAN training step: plain fp32 vs channels_last + bf16 autocast (train_gan's path)."""
    import torch.nn.functional as F
    x = torch.from_numpy(images[:64 * 8]).float().div(255).unsqueeze(1)
    out = {}
    for name, fmt, dtype in [('fp32', torch.contiguous_format, None),
                             ('channels_last+bf16', torch.channels_last, torch.bfloat16)]:
        torch.manual_seed(0)
        G, D = gi.Generator().to(memory_format=fmt), gi.Discriminator().to(memory_format=fmt)
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999)) for m in (G, D))
        real = x.contiguous(memory_format=fmt)

        def step(i):
            batch = real[(i % 8) * 64:(i % 8 + 1) * 64]
            with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                fake = G(torch.randn(64, gi.Z_DIM))
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
        _, seconds = timed(lambda: [step(i) for i in range(steps)])
        out[name] = seconds / steps
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.environ.get('FL_REAL_DATA', '../shared/data')
    p.add_argument('--data-dir', default=os.path.join(root, 'mnist-10k'))
    p.add_argument('--fashion-dir', default=os.path.join(root, 'fashion-mnist'),
                   help='IDX folder of Fashion-MNIST for the cross-dataset prior (skipped if missing)')
    p.add_argument('--run-dir', help='folder with global_model.pth and training_history.json (default: train one)')
    p.add_argument('--cache-dir', default='cache', help='evaluation classifier cache')
    p.add_argument('--gan-cache-dir', help='reuse GANs cached here (default: train them fresh, timed)')
    p.add_argument('--out-dir', default=None, help='where to write the figures (default: a temporary folder)')
    p.add_argument('--seeds', default='0,1,2', help='latent-search seeds on the default GAN')
    p.add_argument('--loop-steps', type=int, default=20, help='search steps for the batched-vs-loop timing')
    p.add_argument('--skip-loops', action='store_true', help='no speed baselines')
    p.add_argument('--skip-mi', action='store_true', help='do not run the confidence-maximisation attack')
    gi.add_arguments(p)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(',')]

    with tempfile.TemporaryDirectory() as tmp:
        target, run_dir = standard_target(args.data_dir, args.run_dir, os.path.join(tmp, 'run'))
        print(f"target: {run_dir}/global_model.pth, test accuracy {target.history['final_test_accuracy']:.4f}; "
              f'torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}')
        eval_model, info = load_or_train_eval_classifier(target.data, 0, args.cache_dir)
        print(f"evaluation classifier: test accuracy {info['test_accuracy']:.4f} "
              f"({'cached' if info['from_cache'] else 'just trained'})")
        out_dir = args.out_dir or os.path.join(tmp, 'figures')
        gan_cache = args.gan_cache_dir or os.path.join(tmp, 'gan_cache')
        checks = []

        # 1. speed of the building blocks, each against its plain baseline, measured here
        if not args.skip_loops:
            speed = gan_step_speed(target.data.test_images)
            print(f"\nGAN training step (batch 64): fp32 {speed['fp32'] * 1e3:.1f} ms, channels_last+bf16 "
                  f"{speed['channels_last+bf16'] * 1e3:.1f} ms -> {speed['fp32'] / speed['channels_last+bf16']:.1f}x")
            torch.manual_seed(0)
            G, D = gi.Generator().eval(), gi.Discriminator().eval()
            R, steps = args.gmi_restarts, args.loop_steps
            gi.invert(G, D, target.model, [0], 1, 2, progress=False)  # warm-up
            (batched, *_), batched_s = timed(lambda: gi.invert(G, D, target.model, list(range(10)), R, steps,
                                                               precision='fp32', progress=False))
            z0 = torch.randn(10 * R, gi.Z_DIM, generator=torch.Generator().manual_seed(
                gi.derive_seed(0, 'gmi', 'latents')))
            singles, loop_s = timed(lambda: [gi.invert(G, D, target.model, [i // R], 1, steps, precision='fp32',
                                                       progress=False, z0=z0[i:i + 1])[0] for i in range(10 * R)])
            diff = (torch.cat(singles).view_as(batched) - batched).abs().max().item()
            (_, bf16_s) = timed(lambda: gi.invert(G, D, target.model, list(range(10)), R, steps, progress=False))
            print(f'latent search, {10 * R} latents x {steps} steps: per-latent loop {loop_s:.2f} s, batched fp32 '
                  f'{batched_s:.2f} s -> {loop_s / batched_s:.1f}x (same images: max |diff| {diff:.1e}); '
                  f'batched channels_last+bf16 {bf16_s:.2f} s -> {batched_s / bf16_s:.1f}x more')

        # 2. the attack as run_all_attacks.py runs it, per public-data protocol
        protocols = ['test', 'classes:5-9']
        if os.path.isdir(args.fashion_dir):
            protocols.append('fashion-mnist')
        else:
            print(f'(no {args.fashion_dir}: cross-dataset prior skipped)')
        rows, default = [], None
        for protocol in protocols:
            for loss in (['logit', 'ce'] if protocol == 'test' else [args.gmi_loss]):
                ns = argparse.Namespace(**{**vars(args), 'gmi_public': protocol, 'gmi_loss': loss, 'seed': 0,
                                           'gmi_public_dir': args.fashion_dir if protocol == 'fashion-mnist' else None,
                                           'cache_dir': gan_cache})
                metrics, _ = gi.run(target, ns, os.path.join(out_dir, protocol.replace(':', '_') + '_' + loss))
                rows.append((protocol, loss, metrics))
                if protocol == 'test' and loss == args.gmi_loss:
                    default = metrics

        print(f"\n{'prior':<14} {'loss':<6} {'attacked':<12} {'best':>5} {'all':>5} {'eval conf':>9} "
              f"{'KNN feat':>8} {'KNN pix':>7} {'GAN s':>6} {'search s':>8}")
        for protocol, loss, m in rows:
            b, a = m['overall']['best_restart'], m['overall']['all_restarts']
            attacked = ','.join(map(str, m['attacked_classes'])) if len(m['attacked_classes']) < 10 else 'all'
            print(f"{protocol:<14} {loss:<6} {attacked:<12} {b['attack_accuracy']:5.2f} {a['attack_accuracy']:5.2f} "
                  f"{b['eval_confidence']:9.3f} {b['knn_feature_distance']:8.2f} {b['knn_pixel_distance']:7.2f} "
                  f"{m['gan_train_seconds']:6.0f}{'*' if m['gan_from_cache'] else ' '} {m['inversion_seconds']:8.1f}")
        print('best = the restart per class the target is most confident about (GMI protocol); all = every restart '
              'averaged (later papers); * = GAN loaded from cache (time of its original training)')

        # extra latent-search seeds on the default GAN: is the default's accuracy luck?
        images, _, _ = gi.public_data(target, 'test')
        G, D, _ = gi.load_or_train_gan(images, 0, args.gmi_gan_steps, args.gmi_batch_size, args.gmi_gan_lr,
                                       args.gmi_precision, 'cpu', gan_cache)
        px, py = private_data(target)
        R = args.gmi_restarts
        lam = gi.DEFAULT_LAMBDA[args.gmi_loss] if args.gmi_lambda is None else args.gmi_lambda
        per_seed = []
        for seed in seeds:
            inv, _, _, log_conf = gi.invert(G, D, target.model, list(range(10)), R, args.gmi_steps, args.gmi_lr,
                                            lam, args.gmi_loss, seed)
            s = score_inversions(eval_model, inv.reshape(-1, 1, 28, 28), np.repeat(np.arange(10), R), px, py)
            correct = (np.asarray(s['per_image']['eval_prediction']) == np.repeat(np.arange(10), R)).reshape(10, R)
            best = log_conf.argmax(1).numpy()
            per_seed.append((correct[np.arange(10), best].mean(), correct.mean()))
            print(f'  latent seed {seed}: best restart {per_seed[-1][0]:.2f}, all restarts {per_seed[-1][1]:.2f}')

        # 3. the confidence-maximisation attack on the same model
        mi_metrics = None
        if not args.skip_mi:
            try:
                from src.attacks import model_inversion as mi
            except ImportError:
                print('(src/attacks/model_inversion.py not found: comparison skipped)')
            else:
                mp = argparse.ArgumentParser()
                mi.add_arguments(mp)
                ns = argparse.Namespace(**vars(mp.parse_args([])), seed=0, cache_dir=args.cache_dir, device='cpu')
                os.makedirs(os.path.join(out_dir, 'model_inversion'), exist_ok=True)
                mi_metrics, _ = mi.run(target, ns, os.path.join(out_dir, 'model_inversion'))
                mb = mi_metrics['overall']['best_restart']
                print(f"\nconfidence maximisation (model_inversion.py, defaults): attack accuracy "
                      f"{mb['attack_accuracy']:.2f}, KNN distance feature {mb['knn_feature_distance']:.2f} pixel "
                      f"{mb['knn_pixel_distance']:.2f}; GMI (default prior): feature "
                      f"{default['knn_feature_distance']:.2f} pixel {default['knn_pixel_distance']:.2f}")

        b, a = default['overall']['best_restart'], default['overall']['all_restarts']
        checks += [
            (f"best-restart attack accuracy {b['attack_accuracy']:.2f} (latent seeds: "
             f"{', '.join(f'{x:.2f}' for x, _ in per_seed)}) >= {TARGETS['best_restart']}",
             min([b['attack_accuracy']] + [x for x, _ in per_seed]) >= TARGETS['best_restart']),
            (f"all-restart attack accuracy {a['attack_accuracy']:.2f} (latent seeds: "
             f"{', '.join(f'{y:.2f}' for _, y in per_seed)}) >= {TARGETS['all_restarts']}",
             min([a['attack_accuracy']] + [y for _, y in per_seed]) >= TARGETS['all_restarts']),
            (f"GAN training {default['gan_train_seconds']:.0f} s{' (cached)' if default['gan_from_cache'] else ''} "
             f"<= {TARGETS['gan_seconds']:.0f} s", default['gan_train_seconds'] <= TARGETS['gan_seconds']),
            (f"inversion of 10 classes x {R} restarts {default['inversion_seconds']:.1f} s <= "
             f"{TARGETS['inversion_seconds']:.0f} s", default['inversion_seconds'] <= TARGETS['inversion_seconds'])]
        for protocol, loss, m in rows:
            if protocol == 'fashion-mnist':
                checks.append((f"GAN training on {m['public_data']['num_images']} fashion images "
                               f"{m['gan_train_seconds']:.0f} s <= {TARGETS['gan_seconds']:.0f} s",
                               m['gan_train_seconds'] <= TARGETS['gan_seconds']))
        if mi_metrics is not None:
            mb = mi_metrics['overall']['best_restart']
            checks += [(f"KNN feature distance {b['knn_feature_distance']:.2f} < confidence maximisation's "
                        f"{mb['knn_feature_distance']:.2f}", b['knn_feature_distance'] < mb['knn_feature_distance']),
                       (f"KNN pixel distance {b['knn_pixel_distance']:.2f} < confidence maximisation's "
                        f"{mb['knn_pixel_distance']:.2f}", b['knn_pixel_distance'] < mb['knn_pixel_distance'])]
        print()
        for text, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {text}")
        if args.out_dir:
            print(f'figures in {args.out_dir}')


if __name__ == '__main__':
    main()
