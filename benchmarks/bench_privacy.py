"""Privacy that can be trusted: DP-SGD's accuracy-epsilon curve at the tuned settings, and membership inference
against the non-private model and a DP one (empirical epsilon beside the accountant's).

    python benchmarks/bench_privacy.py --data-dir ../shared/data/mnist-10k --json OUT.json [--fashion-dir DIR]

0. DP-SGD's speed: a client's local training (src.defenses.dp_client_update, Opacus ghost clipping) against
   the same loop with Opacus's per-example gradient hooks, one thread, alternating, median of --repeats.
1. trains the standard preset (5 IID clients x 10 rounds, seed 0) without DP, then with DP-SGD at each
   --epsilons value (record-level, delta 1e-5, config.py's dp_* settings, tuned on seeds 1 and 2 by tune_dp.py),
   --workers at a time, one thread each;
2. runs the membership attack (src/attacks/membership.py: LiRA offline with --shadows shadow models, the loss
   threshold, and the white-box tests on the recorded client updates) on the non-private model and on the DP
   model at --audit-epsilon, and checks that the empirical epsilon stays below the accountant's;
3. with --fashion-dir, the DP curve's --fashion-epsilons on Fashion-MNIST (60,000 images: slow).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from common import spread  # noqa: E402


def floats(text):
    return [float(v) for v in text.split(',') if v]


def train_one(job):
    """(epsilon or 0, dataset, data dir, output folder) -> the run's summary; one thread per run."""
    import torch
    torch.set_num_threads(1)
    from src.federated import train
    epsilon, dataset, data_dir, out, seed = job
    cfg = config.resolve('standard', {'data_dir': data_dir, 'dataset': dataset, 'output_dir': out, 'seed': seed,
                                      'device': 'cpu', 'dp_epsilon': epsilon})
    h = train(cfg, log=lambda *a: None)
    dp = h['privacy'].get('dp_sgd', {})
    return {'epsilon': dp.get('epsilon'), 'target_epsilon': epsilon or None, 'delta': cfg['dp_delta'],
            'test_accuracy': h['final_test_accuracy'], 'dataset': dataset, 'seconds': h['wall_seconds'],
            'settings': {k: cfg[k] for k in ('dp_local_epochs', 'dp_batch_size', 'dp_learning_rate',
                                             'dp_max_grad_norm', 'num_rounds', 'num_clients')} if epsilon else {},
            'noise_multiplier': dp.get('noise_multiplier'), 'folder': out}


def membership(folder, data_dir, shadows, seed):
    """The membership attack on the model in `folder`: its metrics and the seconds it took."""
    from src.attacks import runner
    from src.attacks.target import load_attack_inputs
    view, private = load_attack_inputs(os.path.join(folder, 'global_model.pth'), data_dir=data_dir, device='cpu')
    args = argparse.Namespace(seed=seed, mia_candidates=1000, mia_shadows=shadows, mia_rounds='first,last')
    t0 = time.perf_counter()
    m = runner.run_attacks(view, private, args, tempfile.mkdtemp(prefix='bench_privacy_'), ['membership'],
                           log=lambda *a: None)[0]['membership_inference']
    return m, time.perf_counter() - t0


def clipping_speed(data_dir, repeats):
    """Samples/s of one client's DP-SGD epoch (1,600 real digits, the default batch): ghost clipping, as
    dp_client_update trains, against Opacus's per-example gradient hooks (the plain Opacus loop)."""
    import torch
    from src.data import load_dataset, to_tensor
    from src.defenses import dp_client_update
    from src.model import CNN
    torch.set_num_threads(1)
    data = load_dataset('mnist', data_dir)
    x, y = to_tensor(data.train_images[:1600], 'cpu'), torch.from_numpy(data.train_labels[:1600].astype('int64'))
    cfg = config.CONFIG
    rates = {'ghost': [], 'hooks': []}
    for _ in range(repeats):
        for mode in rates:
            model = CNN(dropout=cfg['dp_dropout'])
            t0 = time.perf_counter()
            dp_client_update(model, x, y, 1, cfg['dp_batch_size'], cfg['dp_learning_rate'], 1.0, cfg['dp_max_grad_norm'],
                             [], torch.Generator().manual_seed(0), grad_sample_mode=mode)
            rates[mode].append(len(y) / (time.perf_counter() - t0))
    ratio = [g / h for g, h in zip(rates['ghost'], rates['hooks'])]
    print(f"DP-SGD samples/s, one thread: ghost clipping {spread(rates['ghost'], '', 0)}, per-example hooks "
          f"{spread(rates['hooks'], '', 0)}: {spread(ratio, 'x')}", flush=True)
    return {'ghost_samples_per_s': rates['ghost'], 'hooks_samples_per_s': rates['hooks'], 'ratio': ratio}


def brief(game):
    return {'auc': game['auc'], 'tpr_at_0.1pct_fpr': game['tpr_at_0_1pct_fpr'],
            'tpr_at_1pct_fpr': game['tpr_at_1pct_fpr'], 'empirical_epsilon': game['empirical_epsilon']}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=os.path.join('..', 'shared', 'data', 'mnist-10k'))
    p.add_argument('--fashion-dir', help='also the DP curve on Fashion-MNIST (slow)')
    p.add_argument('--epsilons', type=floats, default=[1, 2, 3, 4, 8])
    p.add_argument('--fashion-epsilons', type=floats, default=[3])
    p.add_argument('--audit-epsilon', type=float, default=3, help='the DP model the membership attack also audits')
    p.add_argument('--shadows', type=int, default=16)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--repeats', type=int, default=3, help='runs of the clipping speed comparison')
    p.add_argument('--json', help='write the results here')
    args = p.parse_args()
    started = time.perf_counter()
    speed = clipping_speed(args.data_dir, args.repeats)
    print(f"{time.strftime('%Y-%m-%d')}: standard preset, seed {args.seed}, DP settings from config.py: "
          + ', '.join(f'{k} {config.CONFIG[k]}' for k in ('dp_local_epochs', 'dp_batch_size', 'dp_learning_rate',
                                                          'dp_max_grad_norm')), flush=True)
    root = tempfile.mkdtemp(prefix='bench_privacy_')
    jobs = [(0, 'mnist', args.data_dir, os.path.join(root, 'none'), args.seed)]
    if args.fashion_dir:  # the long ones first, so that one core takes them while the other does the rest
        jobs += [(e, 'fashion-mnist', args.fashion_dir, os.path.join(root, f'fashion-eps{e}'), args.seed)
                 for e in args.fashion_epsilons]
    jobs += [(e, 'mnist', args.data_dir, os.path.join(root, f'eps{e}'), args.seed) for e in args.epsilons]
    runs = []
    with Pool(args.workers) as pool:
        for r in pool.imap(train_one, jobs):
            runs.append(r)
            print(f"{r['dataset']} {'epsilon ' + format(r['epsilon'], '.2f') if r['epsilon'] else 'no DP'}: test "
                  f"accuracy {r['test_accuracy']:.4f} ({r['seconds']:.0f} s)", flush=True)
    non_private = runs[0]
    dp = runs[1:]
    for r in dp:
        print(f"DP {r['dataset']}: epsilon {r['epsilon']:.2f} (target {r['target_epsilon']}), sigma "
              f"{r['noise_multiplier']:.3f} -> {r['test_accuracy']:.2%}")

    results = {'non_private_accuracy': non_private['test_accuracy'], 'dp_clipping_speed': speed,
               'dp': [{k: r[k] for k in ('epsilon', 'delta', 'test_accuracy', 'settings', 'dataset',
                                         'noise_multiplier')} for r in dp]}
    audits = [('membership', non_private)] + [('membership_under_dp', r) for r in dp
                                              if r['dataset'] == 'mnist' and r['target_epsilon'] == args.audit_epsilon]
    for key, run in audits:
        m, seconds = membership(run['folder'], args.data_dir, args.shadows, args.seed)
        update = m['client_update']['headline'] if m['client_update']['rounds'] else None
        results[key] = {'shadow_models': args.shadows, 'seconds': seconds, 'accountant_epsilon': run['epsilon'],
                        'final_model': brief(m['final_model']['lira']),
                        'final_model_loss_threshold': brief(m['final_model']['loss_threshold']),
                        'final_model_no_attack': brief(m['final_model']['no_attack_baseline']['lira']),
                        'client_update': brief(update) if update else None,
                        'client_update_no_attack': brief(update['no_attack_baseline']) if update else None}
        print(f"{key}: {m['summary']} ({seconds:.0f} s)", flush=True)
        if run['epsilon'] is not None:
            worst = max(g['empirical_epsilon'] for g in [m['final_model']['lira'], m['final_model']['loss_threshold']]
                        + ([update] if update else []))
            print(f"  empirical epsilon {worst:.2f} {'<=' if worst <= run['epsilon'] else 'ABOVE (a bug)'} accountant "
                  f"{run['epsilon']:.2f}")
    results['seconds'] = time.perf_counter() - started
    print(f"total {results['seconds']:.0f} s")
    if args.json:
        from src.utils import save_json
        save_json(results, args.json)


if __name__ == '__main__':
    main()
