"""Federated training from a resolved config: data -> partition -> rounds of FedAvg -> files."""
import copy
import os
import platform
import queue
import time
from collections import OrderedDict

import numpy as np
import torch
from tqdm import tqdm

from src.batched_training import TRAINERS, batched_round, uses_batched_trainer
from src.client import client_update
from src.defenses import active as active_defenses, client_recipe, defend_update, dp_client_update, epsilon, \
    update_epsilon, with_dp_noise
from src.data import load_dataset, to_tensor
from src.malicious import build_model, craft, crafted_rounds, refusing_clients, validate_malicious
from src.model import MODELS, create_model, dropouts, seed_dropout
from src.partition import DISTRIBUTIONS, partition
from src.server import CuriousServer, evaluate, parse_capture_rounds
from src.utils import UserError, check_finite, check_output_dir, check_seed, derive_seed, load_torch, \
    map_in_threads, resolve_device, resolve_precision, save_json, save_torch, sha256_of_arrays


FLAGS = {'num_clients': '--clients', 'num_rounds': '--rounds', 'learning_rate': '--lr', 'dirichlet_alpha': '--alpha',
         'data_distribution': '--distribution', 'dp_noise_multiplier': '--dp-noise', 'dp_max_grad_norm': '--dp-clip'}


def validate(cfg):
    """Refuse impossible settings before any work starts, each with what to change."""
    check_finite(cfg, {k: FLAGS.get(k, '--' + k.replace('_', '-')) for k in cfg})
    check_seed(cfg['seed'])
    checks = [
        (cfg['num_clients'] >= 1, f"num_clients={cfg['num_clients']}: need at least 1 client (--clients)"),
        (cfg['num_rounds'] >= 1, f"num_rounds={cfg['num_rounds']}: need at least 1 round (--rounds)"),
        (cfg['local_epochs'] >= 1, f"local_epochs={cfg['local_epochs']}: need at least 1 (--local-epochs)"),
        (cfg['batch_size'] >= 1, f"batch_size={cfg['batch_size']}: need at least 1 (--batch-size)"),
        (cfg['learning_rate'] > 0, f"learning_rate={cfg['learning_rate']}: must be positive (--lr)"),
        (cfg['data_distribution'] in DISTRIBUTIONS,
         f"data_distribution={cfg['data_distribution']!r}: choose one of {', '.join(DISTRIBUTIONS)} (--distribution)"),
        (cfg['dirichlet_alpha'] > 0, f"dirichlet_alpha={cfg['dirichlet_alpha']}: must be > 0 (--alpha)"),
        (cfg['dp_noise_multiplier'] >= 0, f"dp_noise_multiplier={cfg['dp_noise_multiplier']}: must be >= 0 (--dp-noise)"),
        (cfg['dp_epsilon'] >= 0, f"dp_epsilon={cfg['dp_epsilon']}: must be > 0, or 0 for off (--dp-epsilon)"),
        (cfg['dp_epsilon'] == 0 or cfg['dp_noise_multiplier'] == 0,
         'DP-SGD: give a target epsilon (--dp-epsilon) or a noise multiplier (--dp-noise), not both'),
        (cfg['dp_local_epochs'] >= 1, f"dp_local_epochs={cfg['dp_local_epochs']}: need at least 1 (--dp-local-epochs)"),
        (cfg['dp_batch_size'] >= 1, f"dp_batch_size={cfg['dp_batch_size']}: need at least 1 (--dp-batch-size)"),
        (cfg['dp_learning_rate'] > 0, f"dp_learning_rate={cfg['dp_learning_rate']}: must be positive (--dp-lr)"),
        (0 <= cfg['dp_dropout'] < 1, f"dp_dropout={cfg['dp_dropout']}: must be in [0, 1) (--dp-dropout)"),
        (cfg['dp_max_grad_norm'] > 0, f"dp_max_grad_norm={cfg['dp_max_grad_norm']}: must be > 0 (--dp-clip)"),
        (0 < cfg['dp_delta'] < 1, f"dp_delta={cfg['dp_delta']}: must be in (0, 1) (--dp-delta)"),
        (cfg['update_clip'] >= 0, f"update_clip={cfg['update_clip']}: must be >= 0 (--update-clip)"),
        (cfg['update_noise'] >= 0, f"update_noise={cfg['update_noise']}: must be >= 0 (--update-noise)"),
        (cfg['update_noise'] == 0 or cfg['update_clip'] > 0,
         'update_noise needs a clipping bound to be scaled by: set --update-clip too'),
        (0 < cfg['keep_fraction'] <= 1, f"keep_fraction={cfg['keep_fraction']}: must be in (0, 1] (--keep-fraction)"),
        (cfg['trainer'] in TRAINERS, f"trainer={cfg['trainer']!r}: choose one of {', '.join(TRAINERS)} (--trainer)"),
        (cfg['model'] in MODELS, f"model={cfg['model']!r}: choose one of {', '.join(MODELS)} (--model)"),
        (cfg['trainer'] != 'batched' or cfg['model'] == 'cnn',
         f"--trainer batched computes the cnn only, not {cfg['model']!r}: use --trainer sequential or auto"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:
        parse_capture_rounds(cfg['capture_rounds'], cfg['num_rounds'])
    except ValueError as e:
        raise UserError(f'{e} (--capture-rounds)') from None
    validate_malicious(cfg)


def validate_model(cfg, spec):
    """The model can be built for the dataset's images, and the malicious server's variants for both."""
    try:
        create_model(cfg['model'], spec)
    except ValueError as e:
        raise UserError(f"--model {cfg['model']}: {e}") from None
    validate_malicious(cfg, spec)


def crafted_round(cfg, server, global_state, client_data, public_x, r, precision, dp_history, progress=None):
    """Round r of a malicious server: it sends each client a crafted model (src.malicious.craft), each
    client that accepts it runs the same local_update (client_update and its defenses) as on any round,
    and the server records what they send back without aggregating it.

    Returns (dp_history, the round's fields for training_history.json).
    """
    sizes = [len(y) for _, y in client_data]
    _, batch_size, lr = client_recipe(cfg)
    shared, sent, params = craft(cfg['malicious_attack'], global_state, public_x, cfg['malicious_bins'], sizes,
                                 lr, batch_size, cfg['secure_aggregation'],
                                 derive_seed(cfg['seed'], 'malicious', r))
    refused = refusing_clients(cfg, sent, client_data)
    model = build_model(shared).to(client_data[0][0].device, memory_format=torch.channels_last)
    results = {c: local_update(cfg, model, sent[c], x, y, r, c, precision, dp_history[c], progress)
               for c, (x, y) in enumerate(client_data) if c not in refused}
    accepted = sorted(results)
    if accepted:
        server.record_crafted(r, shared, sent, params, accepted, [results[c][0] for c in accepted],
                              [results[c][1] for c in accepted])
    return ([results[c][2] if c in results else dp_history[c] for c in range(len(client_data))],
            {'crafted': True, 'aggregated': False, 'malicious_attack': cfg['malicious_attack'],
             'refused_by_clients': {str(c): why for c, why in refused.items()},
             'note': 'the server sent a crafted model; the updates were recorded, not aggregated: the global '
                     "model after this round is the previous round's"})


def client_class_counts(labels, parts, num_classes):
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]


CHECKPOINT = 'checkpoint.pt'
RUN_ONLY = ('device', 'output_dir', 'engine')  # settings that may change between a run and its resumption


def load_checkpoint(cfg):
    path = os.path.join(cfg['output_dir'], CHECKPOINT)
    if not os.path.isfile(path):
        raise UserError(f'--resume: no {CHECKPOINT} in {cfg["output_dir"]} (nothing to resume; run without --resume)')
    ckpt = load_torch(path, 'checkpoint')
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('config'), dict):
        raise UserError(f'--resume: {path} is not a checkpoint main.py wrote; delete it and run without --resume')
    differs = sorted(k for k in cfg if k not in RUN_ONLY and ckpt['config'].get(k) != cfg[k])
    if differs:
        raise UserError(f'--resume: {path} was made with different settings ('
                        + ', '.join(f"{k}={ckpt['config'].get(k)!r} not {cfg[k]!r}" for k in differs) + ')')
    keys = ('round', 'global_state', 'rounds', 'captured', 'dp_history', 'wall_seconds')
    if any(k not in ckpt for k in keys):
        raise UserError(f'--resume: {path} is not a checkpoint main.py wrote (needs {", ".join(keys)}); '
                        f'delete it and run without --resume')
    return ckpt


def privacy_report(cfg, dp_history):
    """Epsilon per client and overall (clients hold disjoint data, so overall = the worst client)."""
    report = {}
    if cfg['dp_noise_multiplier'] > 0:
        eps = [epsilon(h, cfg['dp_delta']) for h in dp_history]
        report['dp_sgd'] = {'accountant': 'opacus rdp', 'level': 'record', 'delta': cfg['dp_delta'],
                            'noise_multiplier': cfg['dp_noise_multiplier'], 'max_grad_norm': cfg['dp_max_grad_norm'],
                            'epsilon_per_client': eps, 'epsilon': max(eps)}
    if cfg['update_clip'] > 0:
        report['update_clip_noise'] = {
            'accountant': 'opacus rdp', 'level': 'client (whole update)', 'delta': cfg['dp_delta'],
            'clip': cfg['update_clip'], 'noise_multiplier': cfg['update_noise'],
            'epsilon': update_epsilon(cfg['num_rounds'], cfg['update_noise'], cfg['dp_delta'])}
    return report


def load_partitions(cfg, log=lambda *a: None):
    """The dataset and each client's index array, as every engine and every client sees them."""
    data = load_dataset(cfg['dataset'], cfg['data_dir'])
    n_train = len(data.train_labels)
    if cfg['num_clients'] > n_train:
        raise UserError(f"num_clients={cfg['num_clients']} but only {n_train} training images: lower --clients")
    parts = partition(data.train_labels, cfg['num_clients'], cfg['data_distribution'],
                      derive_seed(cfg['seed'], 'partition'), cfg['dirichlet_alpha'])
    counts = client_class_counts(data.train_labels, parts, data.spec.num_classes)
    unheld = [c for c in range(data.spec.num_classes) if sum(cc[c] for cc in counts) == 0]
    if unheld:
        log(f"note: no client holds classes {unheld} under {cfg['data_distribution']} with "
            f"{cfg['num_clients']} clients, so the model cannot learn them")
    if min(len(p) for p in parts) == 0:
        raise UserError('a client received no data: lower --clients or change --distribution')
    return data, parts, counts, unheld


def client_tensors(data, parts, device):
    """Each client's (images, labels) on `device`."""
    train_x = to_tensor(data.train_images, device)
    train_y = torch.from_numpy(data.train_labels.astype(np.int64)).to(device)
    return [(train_x[torch.from_numpy(p).to(device)], train_y[torch.from_numpy(p).to(device)]) for p in parts]


def eval_tensors(data, device):
    return to_tensor(data.test_images, device), torch.from_numpy(data.test_labels.astype(np.int64)).to(device)


def init_model(cfg, spec, device):
    """The round-1 global model (cfg['model'] built for `spec`), seeded from the experiment's seed."""
    torch.manual_seed(derive_seed(cfg['seed'], 'init'))
    # channels_last lets oneDNN/cuDNN pick much faster conv kernels (2x measured on CPU)
    model = create_model(cfg['model'], spec).to(device, memory_format=torch.channels_last)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_server(cfg):
    epochs, batch_size, lr = client_recipe(cfg)  # what the protocol announces the clients train with
    return CuriousServer(parse_capture_rounds(cfg['capture_rounds'], cfg['num_rounds']),
                         {'batch_size': batch_size, 'learning_rate': lr, 'local_epochs': epochs,
                          **{k: cfg[k] for k in ('dataset', 'num_clients', 'data_distribution', 'seed')}},
                         secure_aggregation=cfg['secure_aggregation'])


def local_update(cfg, model, global_state, x, y, r, c, precision, dp_history, progress=None):
    """Client c's round-r training from `global_state`, with the config's defenses.

    Returns (state the client sends, num_samples, its DP accountant history). Seeds come
    from (seed, round, client) only, so any engine running this gets the same update.
    """
    seed = cfg['seed']
    model.load_state_dict(global_state)
    # dropout masks from this client's own generator: the same whatever trains beside it
    masks = torch.Generator(x.device).manual_seed(derive_seed(seed, 'dropout', r, c))
    seed_dropout(model, masks)
    shuffle = torch.Generator().manual_seed(derive_seed(seed, 'shuffle', r, c))
    if cfg['dp_noise_multiplier'] > 0:  # fp32, NCHW: Opacus's per-sample gradient hooks
        dp_model = build_model(global_state, model.spec, cfg['model']).to(x.device)  # the architecture it was sent
        dp_model.load_state_dict(global_state)
        seed_dropout(dp_model, masks, cfg['dp_dropout'])
        epochs, batch_size, lr = client_recipe(cfg)
        state, n, dp_history = dp_client_update(dp_model, x, y, epochs, batch_size, lr, cfg['dp_noise_multiplier'],
                                                cfg['dp_max_grad_norm'], dp_history, shuffle)
        if progress is not None:
            progress.update(n * epochs)
    else:
        state, n = client_update(model, x, y, cfg['local_epochs'], cfg['batch_size'],
                                 cfg['learning_rate'], precision, shuffle, progress)
    if cfg['update_clip'] > 0 or cfg['keep_fraction'] < 1:
        noise = torch.Generator().manual_seed(derive_seed(seed, 'update_noise', r, c))
        sent = defend_update({k: state[k] - global_state[k] for k in state}, cfg, noise)
        state = {k: global_state[k] + sent[k] for k in state}
    return state, n, dp_history


def parallel_clients(cfg, device, num_clients):
    """How many clients train at once: one per core on CPU, each with one intra-op thread
    (small convolutions scale poorly across cores: measured 1.1-1.6x over one client using
    both). One on a GPU, and under DP-SGD (Opacus's hooks are not known to be thread-safe)."""
    if device.type != 'cpu' or cfg['dp_noise_multiplier'] > 0:
        return 1
    return max(1, min(num_clients, torch.get_num_threads()))


def train_round(cfg, models, global_state, client_data, r, precision, dp_history, progress=None):
    """Every client's local_update for round r, in client order: [(state, n, dp_history)].

    With several model replicas, that many clients train at once in threads. Each client's
    randomness comes from its own generators and each thread does its own arithmetic in one
    intra-op thread, so the result does not depend on which thread ran which client.
    The batched trainer (cfg['trainer']; 'auto' = on CUDA) trains all clients as one computation instead.
    """
    if uses_batched_trainer(cfg, client_data[0][0].device):
        return batched_round(cfg, global_state, client_data, r, precision, dp_history, dropouts(models[0])[0].p,
                             progress, models[0].spec)

    def one(c, model):
        x, y = client_data[c]
        return local_update(cfg, model, global_state, x, y, r, c, precision, dp_history[c], progress)

    if len(models) == 1:
        return [one(c, models[0]) for c in range(len(client_data))]
    free = queue.SimpleQueue()
    for m in models:
        free.put(m)

    def with_free_model(c):
        m = free.get()
        try:
            return one(c, m)
        finally:
            free.put(m)

    return map_in_threads(with_free_model, range(len(client_data)), len(models))


def write_results(cfg, spec, global_state, server, rounds, dp_history, parts, counts, unheld, device, precision, wall,
                  log=tqdm.write, versions=None):
    """global_model.pth, captured_updates.pt and training_history.json, each written atomically."""
    out = cfg['output_dir']
    steps_per_round = sum(len(p) for p in parts) * client_recipe(cfg)[0]
    history = {
        'config': cfg,
        'dataset_spec': spec.as_dict(),
        'seed': cfg['seed'],
        'device': str(device),
        'precision': precision,
        'torch_threads': torch.get_num_threads(),
        'versions': {'python': platform.python_version(), 'torch': torch.__version__, 'numpy': np.__version__,
                     **(versions or {})},
        'rounds': rounds,
        'defenses': active_defenses(cfg),
        'privacy': privacy_report(cfg, dp_history),
        'final_test_accuracy': rounds[-1]['test_accuracy'],
        'clients': [{'client': c, 'num_samples': int(len(p)), 'class_counts': counts[c]}
                    for c, p in enumerate(parts)],
        'classes_held_by_no_client': unheld,
        'partition': {'sha256': sha256_of_arrays(parts), 'indices': [p.tolist() for p in parts]},
        'wall_seconds': wall,
        'samples_per_second': steps_per_round * cfg['num_rounds'] / sum(r['seconds'] for r in rounds),
    }
    plain_state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in global_state.items())
    # which model this is, where torch keeps a state dict's metadata: load_state_dict reads only 'version'
    plain_state._metadata = {'': {'version': 1, 'model': cfg['model'], 'dataset_spec': spec.as_dict()}}
    save_torch(plain_state, os.path.join(out, 'global_model.pth'))
    save_torch(server.record(), os.path.join(out, 'captured_updates.pt'))
    save_json(history, os.path.join(out, 'training_history.json'))
    log(f"final test accuracy {history['final_test_accuracy']:.4f} in {wall:.1f} s; wrote global_model.pth, "
        f"training_history.json, captured_updates.pt to {out}")
    return history


def train(cfg, log=tqdm.write, resume=False):
    """Run the experiment described by `cfg`; write its files to cfg['output_dir']; return the history.

    A checkpoint is written atomically after every round; with resume=True a killed run
    continues after its last completed round. Every round reseeds from (seed, round, client),
    so no RNG state needs saving and the resumed run equals an uninterrupted one.
    """
    validate(cfg)
    check_output_dir(cfg['output_dir'], 'main.py')  # before any work: a bad folder fails now, not after a round
    started = time.perf_counter()
    data, parts, counts, unheld = load_partitions(cfg, log)
    spec = data.spec
    validate_model(cfg, spec)
    cfg = with_dp_noise(cfg, [len(p) for p in parts], log)
    ckpt = load_checkpoint(cfg) if resume else None
    device = resolve_device(cfg['device'])
    precision = resolve_precision(cfg['precision'], device)
    model, global_state = init_model(cfg, spec, device)
    test_x, test_y = eval_tensors(data, device)
    client_data = client_tensors(data, parts, device)
    models = [model] + [copy.deepcopy(model) for _ in range(parallel_clients(cfg, device, len(parts)) - 1)]

    server = make_server(cfg)
    defenses = active_defenses(cfg)
    dp_history = [[] for _ in parts]  # each client's Opacus RDP accountant history
    if defenses:
        log(f"defenses: {', '.join(defenses)}")
    log(f"training {cfg['num_clients']} clients x {cfg['num_rounds']} rounds x {client_recipe(cfg)[0]} local epochs "
        f"on {cfg['dataset']} ({len(data.train_labels)} train / {len(test_y)} test, {cfg['data_distribution']}) "
        f"on {device} in {precision}")
    rounds, elapsed_before, first_round = [], 0.0, 1
    if ckpt is not None:
        global_state = {k: v.to(device) for k, v in ckpt['global_state'].items()}
        rounds, server.rounds, elapsed_before = ckpt['rounds'], ckpt['captured'], ckpt['wall_seconds']
        dp_history = ckpt['dp_history']
        first_round = ckpt['round'] + 1
        log(f'resuming after round {ckpt["round"]}')
    out = cfg['output_dir']
    os.makedirs(out, exist_ok=True)
    steps_per_round = sum(len(p) for p in parts) * client_recipe(cfg)[0]
    bar = tqdm(range(first_round, cfg['num_rounds'] + 1), desc='rounds', unit='round',
               initial=first_round - 1, total=cfg['num_rounds'])
    crafted = crafted_rounds(cfg)
    for r in bar:
        t0 = time.perf_counter()
        fields = {}
        with tqdm(total=steps_per_round, desc=f'round {r}', unit='img', leave=False) as inner:
            if r in crafted:  # a malicious server's round: recorded, not aggregated
                dp_history, fields = crafted_round(cfg, server, global_state, client_data, test_x, r, precision,
                                                   dp_history, inner)
            else:
                results = train_round(cfg, models, global_state, client_data, r, precision, dp_history, inner)
        if r not in crafted:
            # a false alarm of --client-verify: that client sits out (here it trained anyway; its update is dropped)
            refused = refusing_clients(cfg, [global_state] * len(results), client_data)
            ids = [c for c in range(len(results)) if c not in refused]
            dp_history = [h if c in ids else dp_history[c] for c, (_, _, h) in enumerate(results)]
            if ids:
                global_state = server.aggregate(r, global_state, ids, [results[c][0] for c in ids],
                                                [results[c][1] for c in ids])
            if refused:
                fields = {'refused_by_clients': {str(c): why for c, why in refused.items()}}
        model.load_state_dict(global_state)
        test_loss, test_acc = evaluate(model, test_x, test_y)
        rounds.append({'round': r, 'test_loss': test_loss, 'test_accuracy': test_acc,
                       'seconds': time.perf_counter() - t0, **fields})
        bar.set_postfix(test_acc=f'{test_acc:.4f}', loss=f'{test_loss:.4f}')
        log(f'round {r}: test accuracy {test_acc:.4f}, test loss {test_loss:.4f}')
        save_torch({'config': cfg, 'round': r, 'global_state': {k: v.cpu() for k, v in global_state.items()},
                    'rounds': rounds, 'captured': server.rounds, 'dp_history': dp_history,
                    'wall_seconds': elapsed_before + time.perf_counter() - started},
                   os.path.join(out, CHECKPOINT))

    wall = elapsed_before + time.perf_counter() - started
    history = write_results(cfg, spec, global_state, server, rounds, dp_history, parts, counts, unheld, device,
                            precision, wall, log)
    os.remove(os.path.join(out, CHECKPOINT))  # the finished files supersede it
    return history
