"""The files main.py writes, read back and checked once, at load time, against what the attacks need.

A malformed file ends in one UserError naming the file and the field, before any attack work starts,
instead of a traceback (or a wrong answer) somewhere later.
"""
import json
import math
import os

import torch

from src.model import MODELS
from src.utils import UserError, load_torch


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# training setting -> (check, what it must be); the settings the attacks read
HISTORY_CONFIG = {
    'dataset': (lambda v: isinstance(v, str), 'a dataset name'),
    'data_dir': (lambda v: v is None or isinstance(v, str), 'a folder or null'),
    'data_distribution': (lambda v: isinstance(v, str), 'a distribution name'),
    'num_clients': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'num_rounds': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'local_epochs': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'batch_size': (lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    'learning_rate': (lambda v: _is_number(v) and v > 0, 'a finite number > 0'),
    'seed': (lambda v: _is_int(v) and v >= 0, 'an integer >= 0'),
    'secure_aggregation': (lambda v: isinstance(v, bool), 'true or false'),
    'dp_noise_multiplier': (lambda v: _is_number(v) and v >= 0, 'a finite number >= 0'),
    'dp_max_grad_norm': (lambda v: _is_number(v) and v > 0, 'a finite number > 0'),
    'update_clip': (lambda v: _is_number(v) and v >= 0, 'a finite number >= 0'),
    'update_noise': (lambda v: _is_number(v) and v >= 0, 'a finite number >= 0'),
    'keep_fraction': (lambda v: _is_number(v) and 0 < v <= 1, 'a number in (0, 1]'),
}


def load_history(path):
    """training_history.json, checked: config, partition indices, per-round accuracy, final accuracy."""
    if not os.path.isfile(path):
        raise UserError(f'training history not found: {path} (run main.py first, or pass --history)')
    try:
        with open(path) as f:
            history = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'training history {path}: not readable JSON ({e})') from None

    def bad(field, what):
        return UserError(f'training history {path}: {field} must be {what}')

    if not isinstance(history, dict):
        raise bad('the file', 'a JSON object')
    cfg = history.get('config')
    if not isinstance(cfg, dict):
        raise bad('config', 'an object of settings')
    for key, (ok, what) in HISTORY_CONFIG.items():
        if key not in cfg:
            raise bad(f'config.{key}', f'present ({what})')
        if not ok(cfg[key]):
            raise bad(f'config.{key}', f'{what}, not {cfg[key]!r}'[:200])
    model = cfg.get('model', 'cnn')  # runs from before the registry trained the cnn
    if not (isinstance(model, str) and model in MODELS):
        raise bad('config.model', f"one of {', '.join(MODELS)}, not {model!r}"[:200])
    acc = history.get('final_test_accuracy')
    if not (_is_number(acc) and 0 <= acc <= 1):
        raise bad('final_test_accuracy', 'a number in [0, 1]')
    rounds = history.get('rounds')
    if not isinstance(rounds, list) or not all(isinstance(r, dict) and _is_number(r.get('test_accuracy', None))
                                               for r in rounds):
        raise bad('rounds', 'a list of {round, test_accuracy, ...}')
    partition = history.get('partition')
    indices = partition.get('indices') if isinstance(partition, dict) else None
    if not isinstance(indices, list) or len(indices) != cfg['num_clients']:
        raise bad('partition.indices', f"a list of {cfg['num_clients']} index lists (one per client)")
    for c, part in enumerate(indices):
        if not isinstance(part, list) or not all(_is_int(i) and i >= 0 for i in part):
            raise bad(f'partition.indices[{c}]', 'a list of non-negative integers')
    for key, kind in (('defenses', list), ('privacy', dict)):
        if key in history and not isinstance(history[key], kind):
            raise bad(key, f'a {kind.__name__}')
    return history


def load_captured(path, expected_shapes):
    """captured_updates.pt (weights_only), checked against the model's parameter names and shapes."""
    record = load_torch(path, 'captured updates')

    def bad(field, what):
        return UserError(f'captured updates {path}: {field} must be {what}')

    def check_state(state, field):
        if not isinstance(state, dict):
            raise bad(field, 'a dict of tensors')
        for name, shape in expected_shapes.items():
            t = state.get(name)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != tuple(shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise bad(f'{field}[{name!r}]', f'a float tensor of shape {tuple(shape)}, not {got}')

    if not isinstance(record, dict) or not _is_int(record.get('format')) or record['format'] != 1:
        raise bad('the file', 'a record written by main.py (format 1)')
    if not isinstance(record.get('meta'), dict):
        raise bad('meta', 'a dict of the training protocol (batch size, learning rate, local epochs)')
    for key, ok in (('learning_rate', lambda v: _is_number(v) and v > 0),
                    ('local_epochs', lambda v: _is_int(v) and v >= 1), ('batch_size', lambda v: _is_int(v) and v >= 1)):
        if not ok(record['meta'].get(key)):
            raise bad(f'meta.{key}', 'present and positive')
    rounds = record.get('rounds')
    if not isinstance(rounds, list) or not rounds:
        raise bad('rounds', "a non-empty list (train with --capture-rounds other than 'none')")
    for i, rd in enumerate(rounds):
        field = f'rounds[{i}]'
        if not isinstance(rd, dict) or not _is_int(rd.get('round')):
            raise bad(f'{field}.round', 'an integer')
        check_state(rd.get('global_state'), f'{field}.global_state')
        if 'updates' in rd:
            updates = rd['updates']
            if not isinstance(updates, list) or not updates:
                raise bad(f'{field}.updates', 'a non-empty list')
            for j, u in enumerate(updates):
                if not isinstance(u, dict) or not _is_int(u.get('client')) or u['client'] < 0:
                    raise bad(f'{field}.updates[{j}].client', 'a client number')
                if not _is_int(u.get('num_samples')) or u['num_samples'] < 1:
                    raise bad(f'{field}.updates[{j}].num_samples', 'an integer >= 1')
                if isinstance(u.get('delta'), dict):  # a crafted round's row-sparse tensors (server.compact)
                    u['delta'] = {k: _dense(v, f'{field}.updates[{j}].delta[{k!r}]', bad) for k, v in u['delta'].items()}
                check_state(u.get('delta'), f'{field}.updates[{j}].delta')
        elif isinstance(rd.get('aggregate'), dict):
            agg = rd['aggregate']
            for key in ('num_clients', 'num_samples'):
                if not _is_int(agg.get(key)) or agg[key] < 1:
                    raise bad(f'{field}.aggregate.{key}', 'an integer >= 1')
            check_state(agg.get('delta'), f'{field}.aggregate.delta')
        else:
            raise bad(field, "a round with 'updates' or 'aggregate'")
        if 'crafted' in rd:
            _check_crafted(rd, field, bad)
    return record


def _dense(t, field, bad):
    if not isinstance(t, torch.Tensor) or t.layout == torch.strided:
        return t
    try:
        return t.to_dense()
    except RuntimeError:
        raise bad(field, 'a readable tensor') from None


def _check_crafted(rd, field, bad):
    """A malicious server's round (src.malicious): its crafting parameters and, for the imprint block, the
    extra tensors in the crafted model and in every update, consistent with each other."""
    crafted = rd['crafted']
    if not isinstance(crafted, dict) or crafted.get('attack') not in ('imprint', 'loki', 'fc1'):
        raise bad(f'{field}.crafted', "the crafting parameters of 'imprint', 'loki' or 'fc1'")
    if crafted['attack'] == 'fc1':
        return
    weight = rd['global_state'].get('imprint.weight')
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != 28 * 28:
        raise bad(f'{field}.global_state[imprint.weight]', 'a (bins, 784) tensor')
    bins = weight.shape[0]
    groups = crafted.get('groups')
    for key, shape in (('lower', (bins,)), ('upper', (bins,)), ('group', (bins,)),
                       ('directions', (groups, 28 * 28))):
        t = crafted.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise bad(f'{field}.crafted.{key}', f'a tensor of shape {shape}')
    rows = crafted.get('client_rows')
    if rows is not None and not (isinstance(rows, list) and all(
            isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r) and 0 <= r[0] <= r[1] <= bins
            for r in rows)):
        raise bad(f'{field}.crafted.client_rows', f'null or [first, end] row ranges within {bins} bins')
    deltas = [u['delta'] for u in rd['updates']] if 'updates' in rd else [rd['aggregate']['delta']]
    for j, delta in enumerate(deltas):
        for key, shape in (('imprint.weight', (bins, 28 * 28)), ('imprint.bias', (bins,))):
            t = delta.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise bad(f'{field} update {j} [{key}]', f'a tensor of shape {shape}')
