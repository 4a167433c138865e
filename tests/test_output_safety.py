"""Never destroy a user's files: output-folder rules, pre-flight refusals, strict JSON, kill safety.

Script-level cases run as subprocesses (cwd = the repository root unless a case needs another
current directory); those short runs are started together, a few at a time, by one module
fixture, and each case is then checked by its own test. The many other permutations (flags,
output paths) call main.main(argv) / run_all_attacks.main(argv) in-process, to spare a process
and a torch import each; one case of each kind also runs from the command line.
"""
import copy
import glob
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from src.federated import train
from tests.conftest import make_idx_dir, synthetic_digits, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'main.py')
ATTACKS = os.path.join(ROOT, 'run_all_attacks.py')
SWEEP = os.path.join(ROOT, 'run_defense_sweep.py')
MARKER = '.fl-privacy-output.json'
QUIET = lambda *a: None  # noqa: E731

# a second of attack work: for runs that must succeed
FAST_ATTACK = ['--attacks', 'gradient', '--no-gi-rounds', '--gi-map', 'none', '--gi-images', '2',
               '--gi-iterations', '5', '--gi-restarts', '1', '--gi-dropout', 'off', '--device', 'cpu']
# many minutes of attack work: a run that is not refused up front runs into its timeout
SLOW_ATTACK = ['--attacks', 'gradient', '--no-gi-rounds', '--gi-images', '2', '--gi-iterations', '200000',
               '--device', 'cpu']
# A refusal takes a few seconds on an idle machine; the limit is generous because the test machine may
# be shared. "Up front" is checked by the absence of any attack output, not by the clock.
UP_FRONT_S = 300
ATTACK_STARTED = ('== gradient', 'gradient inversion', '== model', '== gan')


# ---------------------------------------------------------------- helpers

@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


def run(argv, cwd=ROOT, timeout=120):
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, *map(str, argv)], cwd=str(cwd), capture_output=True, text=True,
                           timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0, False)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors='replace') if isinstance(b, bytes) else (b or '')
        return Result(None, text(e.stdout), text(e.stderr), time.monotonic() - t0, True)


def run_many(jobs, workers=3):
    """{name: Result} for {name: dict(argv=, cwd=, timeout=)}, a few at a time."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(run, job['argv'], job.get('cwd', ROOT), job.get('timeout', 120))
                   for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def tail(res):
    return f'rc={res.rc} after {res.seconds:.1f} s\nstderr tail:\n{res.stderr[-3000:]}'


def assert_one_error_line(res, *names, up_front=True):
    """Refused: non-zero exit, no traceback, stderr ends in one 'error:' line naming one of `names`."""
    assert not res.timed_out, f'still running after {res.seconds:.0f} s: not refused up front\n{tail(res)}'
    assert res.rc != 0, f'expected a refusal\n{tail(res)}'
    if up_front:
        started = [m for m in ATTACK_STARTED if m in res.stdout + res.stderr]
        assert not started, f'refused only after attack work began\n{tail(res)}'
    assert 'Traceback' not in res.stderr, tail(res)
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith('error:'), tail(res)
    if names:
        assert any(n(lines[-1]) if callable(n) else str(n) in lines[-1] for n in names), \
            f'the error line names none of {names}: {lines[-1]!r}'
    return lines[-1]


def assert_ok(res):
    assert not res.timed_out and res.rc == 0, tail(res)
    assert 'Traceback' not in res.stderr, tail(res)


def path_names(path):
    """The spellings under which an error line may name `path`."""
    return {str(path), os.path.abspath(path), os.path.realpath(path)}


def snapshot(path):
    """Everything at `path`: None if absent, the bytes of a file, or {relative path: bytes|'<dir>'} of a folder."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return ('file', path.read_bytes())
    tree = {}
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        tree[rel] = '<dir>'
        for name in filenames:
            tree[os.path.join(rel, name)] = Path(dirpath, name).read_bytes()
    return tree


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def strict_json(path):
    """json.loads that refuses NaN, Infinity and -Infinity tokens."""
    def refuse(token):
        raise ValueError(f'{path}: non-standard JSON token {token}')
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def siblings(folder, kind):
    """Hidden '.<name>.<kind>-*' folders beside `folder` (kind: staging or old)."""
    folder = Path(folder)
    return sorted(glob.glob(os.path.join(glob.escape(str(folder.parent)), f'.{glob.escape(folder.name)}.{kind}-*')))


def resolve_dotted(obj, dotted):
    """The value at a dotted path ('a.b.0', 'a.b[0]'); raises LookupError where the path does not fit."""
    for part in re.findall(r'[^.\[\]]+', dotted):
        if isinstance(obj, list):
            obj = obj[int(part)]
        elif isinstance(obj, dict):
            obj = obj[part]
        else:
            raise LookupError(dotted)
    return obj


def check_non_finite_listing(obj, where):
    """A strict JSON object with nulls for non-finite values must list them under 'non_finite'."""
    assert 'non_finite' in obj, f'{where}: has no top-level non_finite listing'
    listing = obj['non_finite']
    assert isinstance(listing, dict) and listing, f'{where}: non_finite must be a non-empty object'
    assert all(isinstance(k, str) for k in listing)
    assert set(listing.values()) <= {'nan', 'inf', '-inf'}, \
        f"{where}: non_finite maps paths to 'nan'|'inf'|'-inf', got {sorted(set(map(str, listing.values())))}"
    resolved = []
    for dotted in listing:
        try:
            resolved.append((dotted, resolve_dotted(obj, dotted)))
        except (LookupError, ValueError, IndexError, TypeError):
            pass  # a key holding a dot: not resolvable without knowing the writer's escaping
    assert resolved, f'{where}: none of the non_finite paths resolves: {list(listing)[:5]}'
    assert all(v is None for _, v in resolved), [(d, v) for d, v in resolved if v is not None][:5]


def strip_wall_clock(history):
    """training_history.json without the fields that legitimately differ between equal runs."""
    h = copy.deepcopy(history)
    h.pop('wall_seconds', None)
    h.pop('samples_per_second', None)
    for r in h.get('rounds', []):
        r.pop('seconds', None)
    h.get('config', {}).pop('output_dir', None)  # the runs write to different folders
    return h


def mem_available_gb():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2 ** 30
    except (ValueError, OSError):
        return 0.0


# ---------------------------------------------------------------- shared runs

@pytest.fixture(scope='module')
def base(tmp_path_factory):
    return tmp_path_factory.mktemp('safety')


@pytest.fixture(scope='module')
def data_dir(base):
    return make_idx_dir(base / 'data', n_train=300, n_test=100)


@pytest.fixture(scope='module')
def trained(base, data_dir):
    """A tiny finished training run: global_model.pth, training_history.json, captured_updates.pt."""
    train(tiny_config(data_dir, base / 'run'), log=QUIET)
    return base / 'run'


@pytest.fixture(scope='module')
def results(base, trained):
    """A results folder that run_all_attacks.py wrote (so it carries the tool's marker)."""
    res = run([ATTACKS, '--model', trained / 'global_model.pth', '--output-dir', base / 'results',
               '--cache-dir', base / 'cache', *FAST_ATTACK], timeout=300)
    assert_ok(res)
    return base / 'results'


def attacks_argv(model, out, cache, attack=SLOW_ATTACK, *extra):
    return [ATTACKS, '--model', model, '--output-dir', out, '--cache-dir', cache, *attack, *extra]


def main_argv(data_dir, out, *extra):
    return [MAIN, '--config', 'quick', '--data-dir', data_dir, '--output-dir', out, '--rounds', '1',
            '--local-epochs', '1', '--device', 'cpu', *extra]


def sweep_argv(data_dir, out, cache):
    return [SWEEP, '--config', 'quick', '--data-dir', data_dir, '--output-dir', out, '--cache-dir', cache,
            '--attacks', 'gradient', '--no-gi-rounds', '--gi-map', 'none', '--gi-images', '2', '--device', 'cpu']


def write(path, text='a user file\n'):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# run_all_attacks.py output folders: which run in a process of their own (the rest run in-process)
ATTACKS_REFUSED_CLI = ['dot', 'training_folder', 'proc']
ATTACKS_REFUSED = ['foreign_file_in_results', 'unmarked_with_user_file', 'other_tool_marker', 'corrupt_marker',
                   'regular_file', 'under_regular_file']
ATTACKS_ACCEPTED_CLI = ['earlier_results']
ATTACKS_ACCEPTED = ['new_folder', 'new_folder_in_new_parent', 'empty_folder']
SWEEP_REFUSED = ['regular_file', 'attack_results']


def attacks_case(name, d, trained, results):
    """Set up one run_all_attacks.py output case under folder d: {out, target, names, cwd, model}."""
    case = {'model': trained / 'global_model.pth', 'cwd': ROOT}
    if name == 'dot':
        cwd = d / 'cwd'
        write(cwd / 'user.txt')
        write(cwd / 'sub' / 'notes.txt')
        dot_named = lambda line: (any(p in line for p in path_names(cwd))  # noqa: E731
                                  or re.search(r"(^|[\s'\"`])\.($|[\s'\"`:,;)])", line) is not None)
        return dict(case, out='.', target=cwd, names=(dot_named,), cwd=cwd)
    if name == 'training_folder':
        t = d / 'run'
        shutil.copytree(trained, t)
        return dict(case, out=t, target=t, names=path_names(t), model=t / 'global_model.pth')
    if name == 'proc':
        return dict(case, out='/proc/x', target=None, names=('/proc/x',))
    if name in ('foreign_file_in_results', 'earlier_results'):
        t = d / 'results'
        shutil.copytree(results, t)
        if name == 'foreign_file_in_results':
            write(t / 'notes.txt')
        return dict(case, out=t, target=t, names=path_names(t))
    if name == 'unmarked_with_user_file':
        t = d / 'unmarked'
        write(t / 'thesis.tex')
        return dict(case, out=t, target=t, names=path_names(t))
    if name == 'other_tool_marker':
        t = d / 'other_tool'
        write(t / 'a.txt')
        write(t / MARKER, json.dumps({'tool': 'some_other_tool', 'files': ['a.txt']}))
        return dict(case, out=t, target=t, names=path_names(t))
    if name == 'corrupt_marker':
        t = d / 'corrupt_marker'
        write(t / MARKER, '{"tool": "run_all_attacks", "files": [')
        write(t / 'metrics.json', '{}')
        return dict(case, out=t, target=t, names=path_names(t))
    if name == 'regular_file':
        t = write(d / 'a_file.txt')
        return dict(case, out=t, target=t, names=path_names(t))
    if name == 'under_regular_file':
        f = write(d / 'plain_file.txt')
        return dict(case, out=f / 'sub', target=f, names=path_names(f / 'sub') | path_names(f))
    if name == 'new_folder':
        return dict(case, out=d / 'new_results', target=d / 'new_results', names=())
    if name == 'new_folder_in_new_parent':
        return dict(case, out=d / 'new' / 'results', target=d / 'new' / 'results', names=())
    if name == 'empty_folder':
        (d / 'empty').mkdir(parents=True)
        return dict(case, out=d / 'empty', target=d / 'empty', names=())
    raise ValueError(name)


@pytest.fixture(scope='module')
def cases(base, data_dir, trained, results):
    """Set up the script-level cases that run in a process of their own, run them (a few at a time).

    {(group, name): {'result': Result, 'target': path checked afterwards, 'before': its snapshot, 'names': ...}}
    """
    root = base / 'cases'
    cache = base / 'cache'
    specs = {}

    def add(group, name, argv, target=None, cwd=ROOT, timeout=UP_FRONT_S, names=()):
        specs[(group, name)] = {'argv': argv, 'cwd': cwd, 'timeout': timeout, 'target': target, 'names': names}

    for name in ATTACKS_REFUSED_CLI:
        c = attacks_case(name, root / 'attacks' / name, trained, results)
        add('attacks', name, attacks_argv(c['model'], c['out'], cache), c['target'], c['cwd'], names=c['names'])
    for name in ATTACKS_ACCEPTED_CLI:
        c = attacks_case(name, root / 'attacks' / name, trained, results)
        add('attacks_ok', name, attacks_argv(c['model'], c['out'], cache, FAST_ATTACK), c['target'], c['cwd'],
            timeout=180)

    # main.py from the command line (the other main.py cases run in-process, below)
    d = root / 'main'
    shutil.copytree(results, d / 'attack_results')
    t = d / 'attack_results'
    add('main', 'attack_results', main_argv(data_dir, t), t, names=path_names(t))
    add('main', '--lr=nan', main_argv(data_dir, d / 'nan_lr', '--lr=nan'), d / 'nan_lr', names=('--lr',))
    (d / 'links').mkdir(parents=True)
    os.symlink('loop', d / 'links' / 'loop')
    add('main', 'data_dir_loop', main_argv(d / 'links' / 'loop', d / 'out_loop'), d / 'out_loop', timeout=120)

    # run_defense_sweep.py: refused output folders
    d = root / 'sweep'
    t = write(d / 'a_file.txt')
    add('sweep', 'regular_file', sweep_argv(data_dir, t, cache), t, names=path_names(t))
    shutil.copytree(results, d / 'attack_results')
    t = d / 'attack_results'
    add('sweep', 'attack_results', sweep_argv(data_dir, t, cache), t, names=path_names(t))

    for spec in specs.values():
        spec['before'] = snapshot(spec['target']) if spec['target'] is not None else None
    outcomes = run_many(specs)
    for key, spec in specs.items():
        spec['result'] = outcomes[key]
    return specs


def check_refused_untouched(case):
    line = assert_one_error_line(case['result'], *case['names'])
    if case['target'] is not None:
        assert snapshot(case['target']) == case['before'], f'{case["target"]} changed; error was {line!r}'
    return line


def check_marked_results(folder):
    """A finished run_all_attacks.py folder: a strict marker listing exactly the other files; no leftovers."""
    folder = Path(folder)
    marker = strict_json(folder / MARKER)
    assert marker.get('tool') == 'run_all_attacks', marker
    assert isinstance(marker.get('files'), list) and all(isinstance(n, str) for n in marker['files'])
    assert set(os.listdir(folder)) - {MARKER} == set(marker['files'])
    assert {'metrics.json', 'report.html'} <= set(marker['files'])
    for name in os.listdir(folder):
        if name.endswith('.json'):
            strict_json(folder / name)
    assert not siblings(folder, 'staging') and not siblings(folder, 'old'), os.listdir(folder.parent)


def call(entry, argv, capsys):
    """Run a script's main(argv) in this process: (exit status, last stderr line or exit message, all output)."""
    capsys.readouterr()
    try:
        entry([str(a) for a in argv])
        rc, message = 0, None
    except SystemExit as e:
        rc, message = (1, e.code) if isinstance(e.code, str) else (e.code or 0, None)
    out = capsys.readouterr()
    lines = (message or out.err).strip().splitlines()
    return rc, (lines[-1] if lines else ''), out.out + out.err


def assert_refused_in_process(rc, line, output, *names):
    assert rc != 0, f'not refused:\n{output[-2000:]}'
    assert line.startswith('error:'), f'last line {line!r}\n{output[-2000:]}'
    if names:
        assert any(str(n) in line for n in names), f'the error line names none of {names}: {line!r}'


# ---------------------------------------------------------------- output folders

def test_results_folder_carries_the_marker(results):
    check_marked_results(results)


@pytest.mark.parametrize('name', ATTACKS_REFUSED_CLI)
def test_run_all_attacks_refuses_folder_it_did_not_write_cli(cases, name):
    check_refused_untouched(cases[('attacks', name)])


@pytest.mark.parametrize('name', ATTACKS_REFUSED)
def test_run_all_attacks_refuses_folder_it_did_not_write(trained, results, base, tmp_path, capsys, name):
    import run_all_attacks
    c = attacks_case(name, tmp_path, trained, results)
    before = snapshot(c['target'])
    rc, line, output = call(run_all_attacks.main, attacks_argv(c['model'], c['out'], base / 'cache', FAST_ATTACK)[1:],
                            capsys)
    assert_refused_in_process(rc, line, output, *c['names'])
    assert not [m for m in ATTACK_STARTED if m in output], f'refused only after attack work began:\n{output[-2000:]}'
    assert snapshot(c['target']) == before, f'{c["target"]} changed; error was {line!r}'


@pytest.mark.parametrize('name', ATTACKS_ACCEPTED_CLI)
def test_run_all_attacks_replaces_its_own_earlier_folder_cli(cases, name):
    case = cases[('attacks_ok', name)]
    assert_ok(case['result'])
    check_marked_results(case['target'])
    assert strict_json(Path(case['target']) / 'metrics.json')['gradient_inversion']


@pytest.mark.parametrize('name', ATTACKS_ACCEPTED)
def test_run_all_attacks_writes_a_new_or_empty_folder(trained, results, base, tmp_path, capsys, name):
    import run_all_attacks
    c = attacks_case(name, tmp_path, trained, results)
    rc, line, output = call(run_all_attacks.main, attacks_argv(c['model'], c['out'], base / 'cache', FAST_ATTACK)[1:],
                            capsys)
    assert rc == 0, output[-3000:]
    check_marked_results(c['target'])
    assert strict_json(Path(c['target']) / 'metrics.json')['gradient_inversion']


def test_main_refuses_a_results_folder_from_the_command_line(cases):
    case = cases[('main', 'attack_results')]
    check_refused_untouched(case)
    assert 'round 1' not in case['result'].stdout + case['result'].stderr, 'refused only after training started'


@pytest.mark.parametrize('name', ['regular_file', 'under_regular_file', 'proc', 'attack_results'])
def test_main_refuses_unusable_or_foreign_output_folder(data_dir, results, tmp_path, capsys, name):
    import main
    if name == 'regular_file':
        out = write(tmp_path / 'a_file.txt')
        target, names = out, path_names(out)
    elif name == 'under_regular_file':
        target = write(tmp_path / 'a_file.txt')
        out, names = target / 'sub', path_names(target / 'sub') | path_names(target)
    elif name == 'proc':
        out, target, names = Path('/proc/x'), None, ('/proc/x',)
    else:
        out = target = tmp_path / 'results'
        shutil.copytree(results, out)
        names = path_names(out)
    before = snapshot(target) if target else None
    rc, line, output = call(main.main, main_argv(data_dir, out)[1:], capsys)
    assert_refused_in_process(rc, line, output, *names)
    assert 'round 1' not in output, 'refused only after training started'
    if target:
        assert snapshot(target) == before


def test_main_writes_into_an_unmarked_folder_and_keeps_the_users_files(data_dir, tmp_path, capsys):
    import main
    folder = tmp_path / 'mine'
    write(folder / 'notes.txt', 'my notes\n')
    write(folder / 'sub' / 'data.csv', '1,2,3\n')
    rc, line, output = call(main.main, main_argv(data_dir, folder, '--precision', 'fp32')[1:], capsys)
    assert rc == 0, output[-2000:]
    assert (folder / 'notes.txt').read_text() == 'my notes\n'
    assert (folder / 'sub' / 'data.csv').read_text() == '1,2,3\n'
    assert {'global_model.pth', 'training_history.json', 'captured_updates.pt'} <= set(os.listdir(folder))
    strict_json(folder / 'training_history.json')


def test_defense_sweep_default_output_dir():
    import run_defense_sweep
    assert run_defense_sweep.parse_args([]).output_dir == 'defense_results'


@pytest.mark.parametrize('name', SWEEP_REFUSED)
def test_defense_sweep_refuses_unusable_or_foreign_output_folder(cases, name):
    check_refused_untouched(cases[('sweep', name)])


# ---------------------------------------------------------------- pre-flight

def test_main_refuses_nan_lr_from_the_command_line(cases):
    case = cases[('main', '--lr=nan')]
    assert_one_error_line(case['result'], '--lr')
    assert not (Path(case['target']) / 'global_model.pth').exists()


NON_FINITE_FLAGS = [('--lr', 'inf'), ('--lr', 'nan'), ('--lr', '-inf'), ('--dp-noise', 'nan'), ('--alpha', 'inf'),
                    ('--update-clip', 'nan'), ('--dp-clip', 'inf'), ('--keep-fraction', 'nan')]


@pytest.mark.parametrize('flag,value', NON_FINITE_FLAGS)
def test_main_refuses_non_finite_float_flags(data_dir, tmp_path, capsys, flag, value):
    import main
    rc, line, output = call(main.main, main_argv(data_dir, tmp_path / 'out', f'{flag}={value}')[1:], capsys)
    assert_refused_in_process(rc, line, output, flag)
    assert not (tmp_path / 'out' / 'global_model.pth').exists()


@pytest.mark.parametrize('seed', ['-5', str(2 ** 70)])
def test_main_refuses_seeds_outside_0_to_2_63(data_dir, tmp_path, capsys, seed):
    import main
    rc, line, output = call(main.main, main_argv(data_dir, tmp_path / 'out', '--seed', seed)[1:], capsys)
    assert_refused_in_process(rc, line, output, 'seed')
    assert not (tmp_path / 'out' / 'global_model.pth').exists()


@pytest.mark.parametrize('seed', ['-5', str(2 ** 70)])
def test_run_all_attacks_refuses_seeds_outside_0_to_2_63(trained, base, tmp_path, capsys, seed):
    import run_all_attacks
    argv = attacks_argv(trained / 'global_model.pth', tmp_path / 'out', base / 'cache', FAST_ATTACK, '--seed', seed)
    rc, line, output = call(run_all_attacks.main, argv[1:], capsys)
    assert_refused_in_process(rc, line, output, 'seed')
    assert not (tmp_path / 'out' / 'metrics.json').exists()


def test_main_data_dir_symlink_loop_from_the_command_line(cases):
    assert_one_error_line(cases[('main', 'data_dir_loop')]['result'])


@pytest.mark.parametrize('kind', ['loop', 'dangling'])
def test_symlinked_data_dir_that_leads_nowhere_is_one_error_line(tmp_path, capsys, kind):
    import main
    os.symlink('loop' if kind == 'loop' else 'nowhere', tmp_path / kind)
    rc, line, output = call(main.main, main_argv(tmp_path / kind, tmp_path / 'out')[1:], capsys)
    assert_refused_in_process(rc, line, output)


# ---------------------------------------------------------------- strict JSON

def test_diverging_training_writes_strict_json(data_dir, tmp_path, capsys):
    import main
    out = tmp_path / 'diverging'
    rc, line, output = call(main.main, main_argv(data_dir, out, '--lr', '1e30', '--precision', 'fp32')[1:], capsys)
    if rc != 0:
        assert line.startswith('error:'), output[-2000:]
        return
    path = out / 'training_history.json'
    history = strict_json(path)
    if any(r.get('test_loss') is None for r in history['rounds']):
        check_non_finite_listing(history, path)


def test_nan_model_attack_results_are_strict_json(trained, tmp_path, base, capsys):
    import run_all_attacks
    run_dir = tmp_path / 'nan_run'
    shutil.copytree(trained, run_dir)
    state = torch.load(run_dir / 'global_model.pth', weights_only=True)
    torch.save({k: torch.full_like(v, float('nan')) for k, v in state.items()}, run_dir / 'global_model.pth')
    out = tmp_path / 'out'
    rc, line, output = call(run_all_attacks.main,
                            attacks_argv(run_dir / 'global_model.pth', out, base / 'cache', FAST_ATTACK)[1:], capsys)
    if rc != 0:
        assert line.startswith('error:'), output[-3000:]
        return
    jsons = [p for p in out.iterdir() if p.name.endswith('.json')]
    assert out / 'metrics.json' in jsons
    for p in jsons:
        strict_json(p)
    metrics = strict_json(out / 'metrics.json')
    if 'non_finite' in metrics:  # the attacks flag a NaN model's images as failed: nothing non-finite may be left
        check_non_finite_listing(metrics, out / 'metrics.json')


# ---------------------------------------------------------------- cache with non-tensor values

@pytest.fixture(scope='module')
def eval_cache(base):
    """(dataset, the cache file bytes, its file name) of one trained evaluation classifier."""
    from src import evaluation as ev
    from src.data import Dataset
    tr_x, tr_y = synthetic_digits(200, 0)
    te_x, te_y = synthetic_digits(100, 1)
    data = Dataset('mnist', tr_x, tr_y, te_x, te_y)
    _, info = ev.load_or_train_eval_classifier(data, 0, str(base / 'eval_cache'), epochs=1)
    return data, Path(info['cache_path']).read_bytes(), os.path.basename(info['cache_path'])


@pytest.mark.parametrize('value', ['not a tensor', 7, None, [1.0, 2.0], {'nested': 1}],
                         ids=['str', 'int', 'none', 'list', 'dict'])
def test_cached_classifier_with_non_tensor_values_is_retrained_with_a_note(eval_cache, tmp_path, capsys, value):
    from src import evaluation as ev
    from src.utils import load_torch, save_torch
    data, blob, name = eval_cache
    path = tmp_path / name
    path.write_bytes(blob)
    saved = load_torch(str(path))
    first = sorted(saved['state_dict'])[0]
    saved['state_dict'][first] = value
    save_torch(saved, str(path))
    capsys.readouterr()
    model, info = ev.load_or_train_eval_classifier(data, 0, str(tmp_path), epochs=1)
    out = capsys.readouterr()
    assert not info['from_cache']
    assert 'note' in (out.out + out.err).lower()
    assert all(isinstance(v, torch.Tensor) for v in load_torch(str(path))['state_dict'].values())  # rewritten


# ---------------------------------------------------------------- reproducibility and kills (main.py)

KILL_ARGS = ['--config', 'quick', '--rounds', '3', '--local-epochs', '2', '--device', 'cpu', '--precision', 'fp32']


def kill_argv(data, out, *extra):
    return [MAIN, '--data-dir', data, '--output-dir', out, *KILL_ARGS, *extra]


@pytest.fixture(scope='module')
def reference(base):
    """(data dir, an uninterrupted fp32 run's folder, its round seconds, its wall seconds)."""
    data = make_idx_dir(base / 'kill_data', n_train=600, n_test=100)
    res = run(kill_argv(data, base / 'reference'), timeout=300)
    assert_ok(res)
    history = json.loads((base / 'reference' / 'training_history.json').read_text())
    round_s = sum(r['seconds'] for r in history['rounds']) / len(history['rounds'])
    return data, base / 'reference', round_s, res.seconds


def test_same_seed_runs_write_byte_identical_files(reference, tmp_path):
    data, ref, _, _ = reference
    again = tmp_path / 'another_name'
    assert_ok(run(kill_argv(data, again), timeout=300))
    for name in ('global_model.pth', 'captured_updates.pt'):
        assert sha256(again / name) == sha256(ref / name), name
    a, b = (strict_json(d / 'training_history.json') for d in (again, ref))
    assert strip_wall_clock(a) == strip_wall_clock(b)


@pytest.mark.parametrize('when,seed', [('after_checkpoint', 0), ('after_checkpoint', 1), ('from_start', 2)])
def test_main_killed_anywhere_then_resumed_equals_uninterrupted(reference, tmp_path, when, seed):
    data, ref, round_s, wall_s = reference
    rng = random.Random(seed)
    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, *map(str, kill_argv(data, out))], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if when == 'after_checkpoint':
            deadline = time.monotonic() + 120
            while not (out / 'checkpoint.pt').exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert (out / 'checkpoint.pt').exists() or (out / 'global_model.pth').exists(), 'no checkpoint appeared'
            time.sleep(rng.uniform(0, 2.2 * round_s))
        else:
            time.sleep(rng.uniform(0, wall_s))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    if (out / 'checkpoint.pt').exists():
        assert_ok(run(kill_argv(data, out, '--resume'), timeout=300))
    else:
        assert_ok(run(kill_argv(data, out), timeout=300))

    assert sha256(out / 'global_model.pth') == sha256(ref / 'global_model.pth')
    got, want = (strict_json(d / 'training_history.json') for d in (out, ref))
    assert strip_wall_clock(got) == strip_wall_clock(want)
    ua = torch.load(out / 'captured_updates.pt', weights_only=True)
    ub = torch.load(ref / 'captured_updates.pt', weights_only=True)
    assert [r['round'] for r in ua['rounds']] == [r['round'] for r in ub['rounds']]
    for ra, rb in zip(ua['rounds'], ub['rounds']):
        for x, y in zip(ra['updates'], rb['updates']):
            assert all(torch.equal(x['delta'][k], y['delta'][k]) for k in y['delta'])
    assert not (out / 'checkpoint.pt').exists()
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


# ---------------------------------------------------------------- kills (run_all_attacks.py)

@pytest.mark.parametrize('seed', [0])
def test_run_all_attacks_killed_mid_run_keeps_previous_results(trained, results, base, tmp_path, seed):
    previous = tmp_path / 'parent' / 'results'
    shutil.copytree(results, previous)
    before = snapshot(previous)
    log = open(tmp_path / 'stderr.txt', 'w')
    argv = attacks_argv(trained / 'global_model.pth', previous, base / 'cache',
                        ['--attacks', 'gradient', '--no-gi-rounds', '--gi-images', '2', '--gi-iterations', '3000',
                         '--gi-restarts', '1', '--device', 'cpu'])
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while not siblings(previous, 'staging') and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(random.Random(seed).uniform(0, 0.5))
        finished_early = proc.poll() is not None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert not finished_early, 'the run ended before it was killed:\n' + (tmp_path / 'stderr.txt').read_text()[-3000:]
    assert snapshot(previous) == before, 'the killed run changed the previous results folder'
    assert siblings(previous, 'staging'), 'no staging folder beside the output while the run was going'

    res = run(attacks_argv(trained / 'global_model.pth', previous, base / 'cache', FAST_ATTACK), timeout=180)
    assert_ok(res)
    check_marked_results(previous)  # replaced, and no staging or old folder left beside it


# ---------------------------------------------------------------- memory

N_BIG = 999_999


@pytest.mark.skipif(mem_available_gb() < 4, reason='needs 4 GB of free memory')
def test_reading_a_big_gzip_idx_peaks_below_1_3x_its_size(tmp_path):
    from src.data import read_idx
    path = tmp_path / 'train-images-idx3-ubyte.gz'
    with gzip.open(path, 'wb', compresslevel=9) as f:
        f.write(struct.pack('>BBBBIII', 0, 0, 8, 3, N_BIG, 28, 28))
        step = 20_000
        block = bytes(784 * step)
        for start in range(0, N_BIG, step):
            k = min(step, N_BIG - start)
            f.write(block if k == step else bytes(784 * k))
        del block
    assert os.path.getsize(path) < 2_000_000
    size = N_BIG * 28 * 28
    tracemalloc.start()
    try:
        images = read_idx(str(path), 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert images.shape == (N_BIG, 28, 28)
    del images
    assert peak < 1.3 * size, f'peak {peak / 1e6:.0f} MB for {size / 1e6:.0f} MB of pixels ({peak / size:.2f}x)'
