"""The malicious server (issue 15): client images recovered verbatim (>= 40 dB) from crafted-model updates,
the ideal beside each (images alone in a bin of the crafted model), the read-out time, what a crafted round
costs the global model, and the client-side check's detection and false alarms.

    python benchmarks/bench_malicious_server.py --data-dir ../shared/data/mnist-10k --json OUT.json

Settings, all on the standard preset's IID split of real digits (5 clients x 1,600, batch 64, lr 0.01), with
the clients' real code (src.federated.local_update -> client_update) on the crafted model:
  fedsgd_b64          one client, 64 images, one local step ('imprint', --bins bins);
  fedavg_client       client 0: 1,600 images x 5 local epochs, one round ('imprint', each of --bin-counts);
  fc1_trap_client     client 0 again, 'fc1' (the agreed architecture: trap rows), round-1 global model;
  secure_aggregation  the 5 clients under secure aggregation, one round ('loki': --bins bins per client).
                      Each client is sent a model of 5 x --bins units with only its share alive; its dead
                      rows take no part (hardtanh(-1) = 0, zero gradient), so each client here trains its
                      live share alone (5x cheaper, the same arithmetic up to summation order) and the
                      server sees the sample-weighted mean of the five updates, read share by share.
                      --shared-sa adds the prototype's setting: one 'imprint' model of --bins shared bins.
Each in the clients' default precision (bf16 autocast where the hardware has it) and, with --fp32 (on by
default for fedsgd and fedavg), fp32 beside it.
  accuracy_cost_points  final test accuracy of the honest standard run minus that of the same run with
                        round 3 crafted ('fc1'; nothing of a crafted round is aggregated whatever the variant).
  client_verify         detection: the share of clients refusing each crafted variant's model (from the standard
                        run's round-3 global model); false alarms: honest global models of --honest-rounds rounds
                        (10 seeds x 10 rounds, 1 local epoch) checked by each of the 5 clients with its images.
Timings are indicative on a shared machine.
"""
import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from src.attacks.malicious_server import best_psnr, ideal_alone, read_fc1  # noqa: E402
from src.federated import client_tensors, eval_tensors, init_model, load_partitions, local_update, train  # noqa: E402
from src.data import MNIST_SPEC  # noqa: E402
from src.malicious import build_model, craft, read_imprint, verify_received  # noqa: E402
from src.server import fedavg  # noqa: E402
from src.utils import resolve_precision, save_json  # noqa: E402

TARGETS = {'fedsgd_b64': 0.95, 'fedavg_client': 0.80, 'secure_aggregation': 0.70, 'accuracy_cost_points': 1.0,
           'readout_seconds': 30.0, 'false_alarms': 0.0}
PROTOTYPE = {'fedsgd_b64': '95 % (N = 4,800)', 'fedavg_client': '56 % at N = 4,800, 76 % at N = 16,000 (fp32)',
             'secure_aggregation': '32 % at N = 16,000 shared (ideal 55 %)'}


def train_client(cfg, sent, x, y, c, precision):
    """Client c's update on the crafted model it was sent, through the project's client code."""
    model = build_model(sent).to(x.device, memory_format=torch.channels_last)
    state, n, _ = local_update(cfg, model, sent, x, y, 1, c, precision, [])
    return {k: state[k] - sent[k] for k in ('imprint.weight', 'imprint.bias')}, n


def score(read, params, images, rows=None):
    """(recovered fraction at >= 40 dB, ideal fraction, claimed bins, claimed bins below 40 dB)."""
    claimed = read['images'][read['claimed']]
    db, _ = best_psnr(claimed, images)
    wrong = int((best_psnr(images, claimed)[0] < 40).sum()) if len(claimed) else 0
    return (float((db >= 40).double().mean()), float(ideal_alone(params, images, rows).double().mean()),
            int(read['claimed'].sum()), wrong)


def one_client(cfg, g, public, x, y, bins, precision):
    started = time.perf_counter()
    state, sent, params = craft('imprint', g, public, bins, [len(y)], cfg['learning_rate'], cfg['batch_size'], False)
    delta, _ = train_client(cfg, sent[0], x, y, 0, precision)
    trained = time.perf_counter() - started
    t0 = time.perf_counter()
    read = read_imprint(delta, params)
    readout = time.perf_counter() - t0
    rec, ideal, claimed, wrong = score(read, params, x)
    return {'recovered_40db': rec, 'ideal': ideal, 'bins': bins, 'groups': params['groups'], 'images': len(y),
            'claimed_bins': claimed, 'claimed_below_40db': wrong, 'precision': precision,
            'readout_seconds': readout, 'client_seconds': trained}


def fc1_client(cfg, g, public, x, y, precision):
    """The agreed architecture: trap rows on fc1 for one FedAvg client; conv features read out exactly, the
    image estimated by inverting the conv stack (src.attacks.malicious_server.read_fc1)."""
    state, sent, params = craft('fc1', g, public, 0, [len(y)], cfg['learning_rate'], cfg['batch_size'], False)
    model = build_model(sent[0]).to(x.device, memory_format=torch.channels_last)
    new, _, _ = local_update(cfg, model, sent[0], x, y, 1, 0, precision, [])
    delta = {k: new[k] - sent[0][k] for k in new}
    t0 = time.perf_counter()
    read = read_fc1(delta, state)
    readout = time.perf_counter() - t0
    db, _ = best_psnr(read['images'], x)
    alone = ideal_alone(params, x, crafted_state=state)
    return {'recovered_40db': float((db >= 40).double().mean()), 'ideal': float(alone.double().mean()),
            'rows_moved': len(read['rows']), 'best_psnr_median_of_alone': float(db[alone].median()) if alone.any()
            else None, 'best_psnr_max': float(db.max()), 'precision': precision, 'readout_seconds': readout}


def secure_aggregation(cfg, g, public, clients, bins, precision, shared=False):
    """One round under secure aggregation: the server holds only the sample-weighted mean update."""
    sizes = [len(y) for _, y in clients]
    started = time.perf_counter()
    if shared:  # one model, bins shared by all clients' images
        state, sent, params = craft('imprint', g, public, bins, sizes, cfg['learning_rate'], cfg['batch_size'], True)
        deltas = [train_client(cfg, sent[c], x, y, c, precision)[0] for c, (x, y) in enumerate(clients)]
    else:       # loki: each client's share is the one-client crafted model (same public data, same quantiles)
        state, sent, params = craft('imprint', g, public, bins, [max(sizes)], cfg['learning_rate'],
                                    cfg['batch_size'], False)
        deltas = [train_client(cfg, sent[0], x, y, c, precision)[0] for c, (x, y) in enumerate(clients)]
    trained = time.perf_counter() - started
    t0 = time.perf_counter()
    if shared:  # what secure aggregation reveals: the sample-weighted mean update
        reads = [(read_imprint(fedavg(deltas, sizes), params), torch.cat([x for x, _ in clients]))]
    else:  # in client c's share only c's update is non-zero: the mean there is n_c / n times it, as fedavg makes it
        reads = [(read_imprint({k: (sizes[c] / sum(sizes)) * v.float() for k, v in deltas[c].items()}, params), x)
                 for c, (x, _) in enumerate(clients)]
    readout = time.perf_counter() - t0
    scores = [score(read, params, images) for read, images in reads]
    total = sum(len(images) for _, images in reads)
    return {'recovered_40db': sum(s[0] * len(i) for s, (_, i) in zip(scores, reads)) / total,
            'ideal': sum(s[1] * len(i) for s, (_, i) in zip(scores, reads)) / total,
            'variant': 'imprint (shared bins)' if shared else 'loki', 'bins': bins if shared else f'{bins} per client',
            'block_units': bins if shared else bins * len(clients), 'groups': params['groups'], 'images': total,
            'claimed_bins': sum(s[2] for s in scores), 'claimed_below_40db': sum(s[3] for s in scores),
            'precision': precision, 'readout_seconds': readout, 'clients_seconds': trained}


def accuracy_cost(data_dir, tmp):
    """Final test accuracy: the honest standard run, and the same run with round 3 crafted."""
    out = {}
    for name, extra in (('honest', {}), ('crafted_round_3', {'server': 'malicious', 'malicious_attack': 'fc1',
                                                             'malicious_rounds': '3'})):
        cfg = config.resolve('standard', {'data_dir': data_dir, 'output_dir': os.path.join(tmp, name), **extra})
        out[name] = train(cfg, log=lambda *a: None)['final_test_accuracy']
    return 100 * (out['honest'] - out['crafted_round_3']), out


def client_verify(data_dir, tmp, g_round3, public, clients, honest_seeds, bins):
    """Detection on every crafted variant, false alarms on honest rounds (each checked by every client)."""
    detected = {}
    sizes = [len(y) for _, y in clients]
    for variant in ('imprint', 'loki', 'fc1'):
        _, sent, _ = craft(variant, g_round3, public, bins, sizes, 0.01, 64, False)
        refused = [bool(verify_received(s, images=x[:256])) for s, (x, _) in zip(sent, clients)]
        weights_only = [bool(verify_received(s)) for s in sent]
        detected[variant] = {'detected': sum(refused) / len(refused),
                             'detected_by_weights_alone': sum(weights_only) / len(weights_only)}
    alarms, checks, rounds = 0, 0, 0
    for seed in range(honest_seeds):
        cfg = config.resolve('standard', {'data_dir': data_dir, 'output_dir': os.path.join(tmp, f'h{seed}'),
                                          'seed': seed, 'local_epochs': 1, 'capture_rounds': 'all'})
        train(cfg, log=lambda *a: None)
        record = torch.load(os.path.join(tmp, f'h{seed}', 'captured_updates.pt'), weights_only=True)
        for rd in record['rounds']:  # the global model each round's clients received
            rounds += 1
            for x, _ in clients:
                checks += 1
                alarms += bool(verify_received(rd['global_state'], images=x[:256]))
    return {'detected': min(d['detected'] for d in detected.values()), 'false_alarms': alarms / max(checks, 1),
            'per_variant': detected, 'honest_rounds': rounds, 'honest_checks': checks}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True)
    p.add_argument('--json', help='write the results here')
    p.add_argument('--bins', type=int, default=16000, help='the default bin count (loki: per client)')
    p.add_argument('--bin-counts', default='4800,16000', help='bin counts for the FedAvg client')
    p.add_argument('--fp32', default='fedsgd,fedavg', help='settings also run with fp32 clients (fedsgd,fedavg,sa)')
    p.add_argument('--shared-sa', action='store_true', help="also secure aggregation with one shared 'imprint' model")
    p.add_argument('--honest-seeds', type=int, default=10, help='honest runs (x 10 rounds) for false alarms')
    p.add_argument('--skip', default='', help='comma-separated: accuracy,verify (to save time)')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = config.resolve('standard', {'data_dir': args.data_dir, 'device': 'cpu'})
    data, parts, _, _ = load_partitions(cfg)
    device = torch.device('cpu')
    clients = client_tensors(data, parts, device)
    public, _ = eval_tensors(data, device)
    _, g = init_model(cfg, MNIST_SPEC, device)
    default = resolve_precision('auto', device)
    precisions = lambda key: [default] + (['fp32'] if key in args.fp32.split(',') and default != 'fp32' else [])
    results = {'date': datetime.date.today().isoformat(), 'default_precision': default, 'targets': TARGETS,
               'prototype': PROTOTYPE, 'bins': args.bins, 'threads': torch.get_num_threads()}
    started = time.perf_counter()

    x, y = clients[0]
    sgd = dict(cfg, local_epochs=1)
    results['fedsgd_b64_all'] = {prec: one_client(sgd, g, public, x[:64], y[:64], args.bins, prec)
                                 for prec in precisions('fedsgd')}
    print('fedsgd b=64', json.dumps(results['fedsgd_b64_all'], indent=1), flush=True)
    results['fedavg_client_all'] = {f'{prec} N={n}': one_client(cfg, g, public, x, y, n, prec)
                                    for n in map(int, args.bin_counts.split(',')) for prec in precisions('fedavg')}
    print('fedavg client', json.dumps(results['fedavg_client_all'], indent=1), flush=True)
    results['fc1_trap_client'] = fc1_client(cfg, g, public, x, y, default)
    print('fc1 traps, one client', json.dumps(results['fc1_trap_client'], indent=1), flush=True)
    results['secure_aggregation_all'] = {f'{prec} loki': secure_aggregation(cfg, g, public, clients, args.bins, prec)
                                         for prec in precisions('sa')}
    if args.shared_sa:
        results['secure_aggregation_all'][f'{default} shared'] = secure_aggregation(cfg, g, public, clients,
                                                                                    args.bins, default, shared=True)
    print('secure aggregation', json.dumps(results['secure_aggregation_all'], indent=1), flush=True)

    pick = lambda key, name: {k: v for k, v in results[key][name].items() if k in ('recovered_40db', 'ideal')}
    results['fedsgd_b64'] = pick('fedsgd_b64_all', default)
    results['fedavg_client'] = pick('fedavg_client_all', f'{default} N={args.bins}')
    results['secure_aggregation'] = pick('secure_aggregation_all', f'{default} loki')
    results['readout_seconds'] = max(results['secure_aggregation_all'][f'{default} loki']['readout_seconds'],
                                     results['fedavg_client_all'][f'{default} N={args.bins}']['readout_seconds'])
    with tempfile.TemporaryDirectory() as tmp:
        skip = args.skip.split(',')
        if 'accuracy' not in skip:
            results['accuracy_cost_points'], results['accuracy'] = accuracy_cost(args.data_dir, tmp)
            print('accuracy cost', results['accuracy_cost_points'], results['accuracy'], flush=True)
        if 'verify' not in skip:
            # the model clients would receive in round 3 of the standard run: the honest run's round-2 result
            g3 = copy.deepcopy(g)
            if 'accuracy' not in skip:
                g3 = torch.load(os.path.join(tmp, 'honest', 'captured_updates.pt'), weights_only=True)['rounds'][2][
                    'global_state']
            results['client_verify'] = client_verify(args.data_dir, tmp, g3, public, clients, args.honest_seeds,
                                                     args.bins)
            print('client verify', json.dumps(results['client_verify'], indent=1), flush=True)
    results['wall_seconds'] = time.perf_counter() - started
    if args.json:
        save_json(results, args.json)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
