"""training_history.json and captured_updates.pt are checked once, at load time.

Whatever a damaged or hand-edited file holds, loading it either succeeds or raises one UserError
naming the file and the field: never a KeyError, TypeError, IndexError, ... from deep inside.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from src.federated import train
from src.model import CNN, param_shapes
from src.utils import UserError
from tests.conftest import make_idx_dir, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda *a: None  # noqa: E731
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Originals(dict):
    """The fixture's content, with a short repr: Hypothesis prints its arguments on failure."""

    def __repr__(self):
        return '<originals>'


def records():
    import src.records
    return src.records


def shapes():
    return param_shapes(CNN())


# ---------------------------------------------------------------- the valid originals

@pytest.fixture(scope='module')
def originals(tmp_path_factory):
    """Two real tiny runs (per-client updates; secure aggregation) and a scratch folder."""
    base = tmp_path_factory.mktemp('records')
    data_dir = make_idx_dir(base / 'data', n_train=150, n_test=50)
    train(tiny_config(data_dir, base / 'plain', num_rounds=2), log=QUIET)
    train(tiny_config(data_dir, base / 'secagg', num_rounds=2, secure_aggregation=True), log=QUIET)
    out = Originals(scratch=base / 'scratch', data_dir=data_dir, plain=base / 'plain')
    out['scratch'].mkdir()
    out['history'] = json.loads((base / 'plain' / 'training_history.json').read_text())
    out['captured'] = torch.load(base / 'plain' / 'captured_updates.pt', weights_only=True)
    out['captured_sa'] = torch.load(base / 'secagg' / 'captured_updates.pt', weights_only=True)
    return out


def test_valid_originals_load(originals):
    r = records()
    history = r.load_history(str(originals['plain'] / 'training_history.json'))
    assert isinstance(history, dict) and history['config']['num_clients'] == 3
    assert history_problem(history) is None
    rec = r.load_captured(str(originals['plain'] / 'captured_updates.pt'), shapes())
    assert isinstance(rec, dict) and [x['round'] for x in rec['rounds']] == [1, 2]
    assert captured_problem(rec, shapes()) is None
    path = originals['scratch'] / 'sa.pt'
    torch.save(originals['captured_sa'], path)
    rec = r.load_captured(str(path), shapes())
    assert all('aggregate' in x for x in rec['rounds']) and captured_problem(rec, shapes()) is None


# ---------------------------------------------------------------- structural editing helpers

def paths_in(obj, prefix=(), list_items=2):
    """Paths to every node of a JSON-like / record tree, visiting only a few items of each list."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths_in(v, prefix + (k,), list_items)
    elif isinstance(obj, list):
        picks = sorted(set(list(range(min(list_items, len(obj)))) + ([len(obj) - 1] if obj else [])))
        for i in picks:
            out += paths_in(obj[i], prefix + (i,), list_items)
    return out


def get_in(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def set_in(obj, path, value):
    """A copy of obj with the node at path replaced (containers copied along the path only)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copied = dict(obj) if isinstance(obj, dict) else list(obj)
    copied[head] = set_in(obj[head], rest, value)
    return copied


def delete_in(obj, path):
    """A copy of obj without the node at path (a non-empty path)."""
    head, rest = path[0], path[1:]
    copied = dict(obj) if isinstance(obj, dict) else list(obj)
    if rest:
        copied[head] = delete_in(obj[head], rest)
    else:
        del copied[head]
    return copied


def apply_edits(obj, edits):
    """edits: [(op, path index, value)]; the path is picked from the current tree's paths."""
    for op, pick, value in edits:
        paths = paths_in(obj)
        path = paths[pick % len(paths)]
        if op == 'delete':
            if path:
                obj = delete_in(obj, path)
        elif op == 'retype':  # a tensor of the wrong shape or dtype in place of a tensor
            if isinstance(get_in(obj, path), torch.Tensor):
                obj = set_in(obj, path, value(get_in(obj, path)))
        else:
            obj = set_in(obj, path, value)
    return obj


def expect_success_or_user_error(load, path, valid=None):
    """load(path) either returns a dict (which, if `valid` is given, must pass it) or raises UserError."""
    try:
        result = load(path)
    except UserError:
        return 'refused'
    except Exception as e:  # noqa: BLE001 - the property under test
        pytest.fail(f'{type(e).__name__} escaped the loader for {path}: {e}')
    assert isinstance(result, dict)
    if valid is not None:
        problem = valid(result)
        assert problem is None, f'the loader accepted {path} although {problem}'
    return 'loaded'


# What the contract promises of a file the loaders accept (a file that fails these must be refused).

def _int(v, low=None):
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def history_problem(h):
    cfg = h.get('config')
    if not isinstance(cfg, dict):
        return 'config is not a dict'
    for key in ('dataset', 'data_distribution'):
        if not isinstance(cfg.get(key), str):
            return f'config.{key} is not a string'
    for key in ('num_clients', 'num_rounds', 'local_epochs', 'batch_size'):
        if not _int(cfg.get(key), 1):
            return f'config.{key} is not an integer >= 1'
    if not (_finite(cfg.get('learning_rate')) and cfg['learning_rate'] > 0):
        return 'config.learning_rate is not a finite number > 0'
    if not _int(cfg.get('seed')):
        return 'config.seed is not an integer'
    if cfg.get('model', 'cnn') not in ('cnn', 'mlp', 'lenet'):  # absent: a run from before the registry
        return 'config.model is not a model of the registry'
    part = h.get('partition')
    indices = part.get('indices') if isinstance(part, dict) else None
    if not isinstance(indices, list) or len(indices) != cfg['num_clients']:
        return 'partition.indices is not one list per client'
    if not all(isinstance(p, list) and all(_int(i, 0) for i in p) for p in indices):
        return 'partition.indices holds something other than lists of non-negative integers'
    acc = h.get('final_test_accuracy')
    if not (_finite(acc) and 0 <= acc <= 1):
        return 'final_test_accuracy is not a finite number in [0, 1]'
    if not isinstance(h.get('rounds'), list):
        return 'rounds is not a list'
    return None


def state_problem(state, where, expected, need_float=True):
    if not isinstance(state, dict):
        return f'{where} is not a dict'
    for name, shape in expected.items():
        t = state.get(name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            return f'{where}[{name}] is not a tensor of shape {shape}'
        if need_float and not t.is_floating_point():
            return f'{where}[{name}] is not a float tensor'
    return None


def captured_problem(rec, expected):
    if rec.get('format') != 1:
        return 'format is not 1'
    if not isinstance(rec.get('meta'), dict):
        return 'meta is not a dict'
    rounds = rec.get('rounds')
    if not isinstance(rounds, list) or not rounds:
        return 'rounds is not a non-empty list'
    for i, rd in enumerate(rounds):
        if not isinstance(rd, dict) or not _int(rd.get('round')):
            return f'rounds[{i}].round is not an integer'
        problem = state_problem(rd.get('global_state'), f'rounds[{i}].global_state', expected)
        if problem:
            return problem
        if 'updates' in rd:
            if not isinstance(rd['updates'], list):
                return f'rounds[{i}].updates is not a list'
            for j, u in enumerate(rd['updates']):
                if not isinstance(u, dict) or not _int(u.get('client')) or not _int(u.get('num_samples'), 1):
                    return f'rounds[{i}].updates[{j}] lacks an integer client or num_samples >= 1'
                problem = state_problem(u.get('delta'), f'rounds[{i}].updates[{j}].delta', expected, False)
                if problem:
                    return problem
        elif 'aggregate' in rd:
            agg = rd['aggregate']
            if not isinstance(agg, dict) or not _int(agg.get('num_clients'), 1) or not _int(agg.get('num_samples'), 1):
                return f'rounds[{i}].aggregate lacks integer num_clients and num_samples'
            problem = state_problem(agg.get('delta'), f'rounds[{i}].aggregate.delta', expected, False)
            if problem:
                return problem
        else:
            return f'rounds[{i}] has neither updates nor aggregate'
    return None


# ---------------------------------------------------------------- training_history.json: property

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5), st.just(2 ** 70), st.just(-2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.just([]), st.just({}), st.just([[]]), st.just([[-1]]), st.just([['0']]), st.just([[0.5]]),
    st.just('0,1,2'), st.just({'indices': 'x'}), st.just({'indices': [[0], [1], [2]]}),
    st.lists(st.integers(-2, 10 ** 6), max_size=3),
    st.lists(st.one_of(st.none(), st.integers(-1, 3), st.text(max_size=2)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
JSON_EDIT = st.one_of(
    st.tuples(st.just('delete'), st.integers(0, 10 ** 6), st.none()),
    st.tuples(st.just('replace'), st.integers(0, 10 ** 6), JSON_VALUES),
)
# the fields the contract names, hit directly as well as through random paths
HISTORY_FIELDS = [('config',), ('config', 'dataset'), ('config', 'num_clients'), ('config', 'num_rounds'),
                  ('config', 'local_epochs'), ('config', 'batch_size'), ('config', 'learning_rate'),
                  ('config', 'data_distribution'), ('config', 'seed'), ('partition',), ('partition', 'indices'),
                  ('partition', 'indices', 0), ('partition', 'indices', 0, 0), ('final_test_accuracy',), ('rounds',),
                  ('rounds', 0)]
FIELD_EDIT = st.tuples(st.sampled_from(['delete', 'replace']), st.sampled_from(HISTORY_FIELDS), JSON_VALUES)


def write_json_file(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f)  # NaN and Infinity tokens included: a hand-edited file may hold them


@SETTINGS
@given(edits=st.lists(JSON_EDIT, min_size=1, max_size=3), field_edit=st.none() | FIELD_EDIT)
def test_any_mutated_history_loads_or_is_one_user_error(originals, edits, field_edit):
    obj = apply_edits(originals['history'], edits)
    if field_edit is not None and isinstance(obj, dict):
        op, path, value = field_edit
        try:
            get_in(obj, path[:-1])[path[-1]]
            obj = delete_in(obj, path) if op == 'delete' else set_in(obj, path, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed or retyped the field's parent
    path = str(originals['scratch'] / 'training_history.json')
    write_json_file(path, obj)
    expect_success_or_user_error(records().load_history, path, history_problem)


@SETTINGS
@given(cut=st.integers(0, 10 ** 6), garbage=st.binary(max_size=20))
def test_truncated_or_garbled_history_is_one_user_error(originals, cut, garbage):
    text = json.dumps(originals['history']).encode()
    path = originals['scratch'] / 'training_history_raw.json'
    path.write_bytes(text[:cut % len(text)] + garbage)
    expect_success_or_user_error(records().load_history, str(path), history_problem)


# ---------------------------------------------------------------- captured_updates.pt: property

def wrong_shape(t):
    return torch.zeros(tuple(t.shape) + (2,))


def fewer_dims(t):
    return torch.zeros(tuple(t.shape[:-1])) if t.dim() else torch.zeros(3)


def int_tensor(t):
    return torch.zeros(t.shape, dtype=torch.int64)


def nan_tensor(t):
    return torch.full(t.shape, float('nan'))


def transposed(t):
    return t.t().contiguous() if t.dim() == 2 else t.flatten()


TENSOR_RETYPES = st.sampled_from([wrong_shape, fewer_dims, int_tensor, nan_tensor, transposed])
PT_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5), st.just(1.5), st.just(float('nan')), st.text(max_size=4),
    st.just([]), st.just({}), st.just([1, 2]), st.just({'a': 1}), st.just((1, 2)),
    st.just(torch.zeros(3)), st.just(torch.zeros(2, 2, dtype=torch.int64)), st.just(torch.tensor(float('nan'))),
    st.just([{'client': 0}]), st.just({'num_clients': 1}),
)
PT_EDIT = st.one_of(
    st.tuples(st.just('delete'), st.integers(0, 10 ** 6), st.none()),
    st.tuples(st.just('replace'), st.integers(0, 10 ** 6), PT_VALUES),
    st.tuples(st.just('retype'), st.integers(0, 10 ** 6), TENSOR_RETYPES),
)


@SETTINGS
@given(secure=st.booleans(), edits=st.lists(PT_EDIT, min_size=1, max_size=3))
def test_any_mutated_captured_record_loads_or_is_one_user_error(originals, secure, edits):
    record = apply_edits(originals['captured_sa' if secure else 'captured'], edits)
    path = str(originals['scratch'] / 'captured_updates.pt')
    torch.save(record, path)
    expect_success_or_user_error(lambda p: records().load_captured(p, shapes()), path,
                                 lambda rec: captured_problem(rec, shapes()))


@SETTINGS
@given(whole=st.one_of(PT_VALUES, st.just({'format': 1}), st.just({'format': 1, 'meta': {}, 'rounds': [{}]}),
                       st.just({'format': 2, 'meta': {}, 'rounds': []}), st.just({'format': '1', 'rounds': [1]})))
def test_captured_file_of_another_shape_is_one_user_error(originals, whole):
    path = str(originals['scratch'] / 'captured_whole.pt')
    torch.save(whole, path)
    with pytest.raises(UserError):
        records().load_captured(path, shapes())


def test_captured_format_that_is_a_tensor_is_one_user_error(originals):
    """Found by the property test above: comparing a tensor 'format' with 1 raised torch's RuntimeError."""
    record = torch.load(originals['plain'] / 'captured_updates.pt', weights_only=True)
    record['format'] = torch.zeros(3)
    path = str(originals['scratch'] / 'captured_tensor_format.pt')
    torch.save(record, path)
    with pytest.raises(UserError, match='format 1'):
        records().load_captured(path, shapes())


def test_a_sparse_delta_with_indices_out_of_range_is_one_user_error(originals):
    """Row-sparse deltas are part of the record now (a 'loki' round); one with an index past its rows made
    to_dense() crash the whole process (segmentation fault) before the loader checked sparse invariants."""
    record = torch.load(originals['plain'] / 'captured_updates.pt', weights_only=True)
    delta = record['rounds'][0]['updates'][0]['delta']
    rows, cols = delta['fc1.weight'].shape
    delta['fc1.weight'] = torch.sparse_coo_tensor(torch.tensor([[10 ** 9]]), torch.zeros(1, cols), (rows, cols),
                                                  check_invariants=False)
    path = str(originals['scratch'] / 'captured_bad_sparse.pt')
    torch.save(record, path)
    with pytest.raises(UserError, match='inconsistent with indices'):
        records().load_captured(path, shapes())


def test_truncated_captured_file_is_one_user_error(originals):
    blob = (originals['plain'] / 'captured_updates.pt').read_bytes()
    path = originals['scratch'] / 'captured_truncated.pt'
    for cut in (0, 10, len(blob) // 3, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(UserError):
            records().load_captured(str(path), shapes())


# ---------------------------------------------------------------- explicit cases: the file and the field named

def history_case(originals, name, edit):
    path = originals['scratch'] / f'history_{name}.json'
    write_json_file(path, edit(json.loads(json.dumps(originals['history']))))
    return str(path)


def _set(path, value):
    return lambda h: set_in(h, path, value)


def _del(path):
    return lambda h: delete_in(h, path)


HISTORY_CASES = {  # name: (edit, words of which the message must hold one)
    'config_is_a_string': (_set(('config',), 'quick'), ['config']),
    'indices_is_a_string': (_set(('partition', 'indices'), '0,1,2'), ['indices']),
    'negative_index': (_set(('partition', 'indices', 0, 0), -1), ['indices']),
    'string_index': (_set(('partition', 'indices', 1, 0), '7'), ['indices']),
    'indices_missing': (_del(('partition', 'indices')), ['indices', 'partition']),
    'final_accuracy_missing': (_del(('final_test_accuracy',)), ['final_test_accuracy']),
    'final_accuracy_nan': (_set(('final_test_accuracy',), float('nan')), ['final_test_accuracy']),
    'final_accuracy_above_one': (_set(('final_test_accuracy',), 1.5), ['final_test_accuracy']),
    'dataset_missing': (_del(('config', 'dataset')), ['dataset']),
    'num_clients_a_string': (_set(('config', 'num_clients'), '3'), ['num_clients']),
    'num_rounds_zero': (_set(('config', 'num_rounds'), 0), ['num_rounds']),
    'batch_size_float': (_set(('config', 'batch_size'), 64.5), ['batch_size']),
    'learning_rate_zero': (_set(('config', 'learning_rate'), 0), ['learning_rate']),
    'learning_rate_inf': (_set(('config', 'learning_rate'), float('inf')), ['learning_rate']),
    'seed_a_string': (_set(('config', 'seed'), 'zero'), ['seed']),
    'distribution_a_number': (_set(('config', 'data_distribution'), 3), ['data_distribution']),
    'rounds_not_a_list': (_set(('rounds',), {'1': 0.5}), ['rounds']),
}


@pytest.mark.parametrize('name', sorted(HISTORY_CASES))
def test_malformed_history_names_file_and_field(originals, name):
    edit, fields = HISTORY_CASES[name]
    path = history_case(originals, name, edit)
    with pytest.raises(UserError) as e:
        records().load_history(path)
    message = str(e.value)
    assert path in message, message
    assert any(f in message for f in fields), f'names none of {fields}: {message}'


def test_history_that_is_not_an_object_is_one_user_error(originals):
    for name, content in (('list', '[1, 2]'), ('number', '3'), ('empty', ''), ('text', 'not json')):
        path = originals['scratch'] / f'history_whole_{name}.json'
        path.write_text(content)
        with pytest.raises(UserError) as e:
            records().load_history(str(path))
        assert str(path) in str(e.value)


def captured_case(originals, name, edit, secure=False):
    path = originals['scratch'] / f'captured_{name}.pt'
    torch.save(edit(originals['captured_sa' if secure else 'captured']), path)
    return str(path)


CAPTURED_CASES = {  # name: (edit, secure aggregation original?, words of which the message must hold one)
    'global_state_missing': (_del(('rounds', 0, 'global_state')), False, ['global_state']),
    'meta_missing': (_del(('meta',)), False, ['meta']),
    'delta_wrong_shape': (lambda r: set_in(r, ('rounds', 1, 'updates', 0, 'delta', 'fc1.weight'), torch.zeros(3, 3)),
                          False, ['delta', 'fc1.weight']),
    'delta_missing_a_tensor': (_del(('rounds', 0, 'updates', 2, 'delta', 'conv1.bias')), False,
                               ['delta', 'conv1.bias']),
    'rounds_empty': (_set(('rounds',), []), False, ['rounds']),
    'rounds_not_a_list': (_set(('rounds',), {'1': {}}), False, ['rounds']),
    'rounds_missing': (_del(('rounds',)), False, ['rounds']),
    'global_state_not_a_tensor': (_set(('rounds', 0, 'global_state', 'conv2.weight'), [0.0]), False,
                                  ['global_state', 'conv2.weight']),
    'round_a_string': (_set(('rounds', 1, 'round'), 'two'), False, ['round']),
    'num_samples_zero': (_set(('rounds', 0, 'updates', 1, 'num_samples'), 0), False, ['num_samples']),
    'client_a_string': (_set(('rounds', 0, 'updates', 1, 'client'), 'alice'), False, ['client']),
    'updates_not_a_list': (_set(('rounds', 0, 'updates'), 'none'), False, ['updates']),
    'aggregate_delta_wrong_shape': (lambda r: set_in(r, ('rounds', 0, 'aggregate', 'delta', 'fc2.bias'),
                                                     torch.zeros(11)), True, ['delta', 'fc2.bias']),
    'aggregate_num_samples_missing': (_del(('rounds', 0, 'aggregate', 'num_samples')), True, ['num_samples']),
}


@pytest.mark.parametrize('name', sorted(CAPTURED_CASES))
def test_malformed_captured_record_names_file_and_field(originals, name):
    edit, secure, fields = CAPTURED_CASES[name]
    path = captured_case(originals, name, edit, secure)
    with pytest.raises(UserError) as e:
        records().load_captured(path, shapes())
    message = str(e.value)
    assert path in message, message
    assert any(f in message for f in fields), f'names none of {fields}: {message}'


# ---------------------------------------------------------------- the scripts: one error line

def run_attacks_argv(run_dir, out, cache):
    return ['--model', str(run_dir / 'global_model.pth'), '--output-dir', str(out), '--cache-dir', str(cache),
            '--attacks', 'gradient', '--gi-images', '2', '--gi-iterations', '5', '--gi-restarts', '1',
            '--gi-rounds-steps', '1', '--gi-map', 'none', '--device', 'cpu']


def run_attacks(run_dir, out, cache):
    argv = [sys.executable, 'run_all_attacks.py', *run_attacks_argv(run_dir, out, cache)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc, *words):
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error:'), proc.stderr[-2000:]
    assert all(w in last for w in words), last
    return last


def test_run_all_attacks_on_malformed_history_is_one_error_line(originals, tmp_path):
    run_dir = tmp_path / 'run'
    shutil.copytree(originals['plain'], run_dir)
    history = json.loads((run_dir / 'training_history.json').read_text())
    history['partition']['indices'] = 'all of them'
    (run_dir / 'training_history.json').write_text(json.dumps(history))
    proc = run_attacks(run_dir, tmp_path / 'out', tmp_path / 'cache')
    assert_one_error_line(proc, 'training_history.json', 'indices')
    assert not (tmp_path / 'out').exists()


def test_run_all_attacks_on_malformed_captured_updates_is_one_error_line(originals, tmp_path, capsys):
    """In-process (main(argv)), to spare a second process: the SystemExit message is the error line."""
    import run_all_attacks
    run_dir = tmp_path / 'run'
    shutil.copytree(originals['plain'], run_dir)
    record = torch.load(run_dir / 'captured_updates.pt', weights_only=True)
    del record['rounds'][0]['global_state']
    torch.save(record, run_dir / 'captured_updates.pt')
    argv = run_attacks_argv(run_dir, tmp_path / 'out', tmp_path / 'cache')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_all_attacks.main(argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith('error:'), (message, capsys.readouterr().err[-2000:])
    assert len(message.strip().splitlines()) == 1
    assert 'captured_updates.pt' in message and 'global_state' in message, message
    assert not (tmp_path / 'out').exists()
