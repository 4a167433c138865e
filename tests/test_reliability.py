"""Crash and resume, safe loading, and one-line errors."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from src.attacks.target import load_model
from src.federated import train
from src.utils import UserError
from tests.conftest import make_idx_dir, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda *a: None  # noqa: E731


def main_cmd(data_dir, out_dir, *extra):
    return [sys.executable, 'main.py', '--config', 'quick', '--data-dir', data_dir, '--output-dir', str(out_dir),
            '--rounds', '3', '--local-epochs', '2', '--device', 'cpu', *extra]


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path):
    data_dir = make_idx_dir(tmp_path / 'data', n_train=1500, n_test=100)
    killed = tmp_path / 'killed'
    proc = subprocess.Popen(main_cmd(data_dir, killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / 'checkpoint.pt').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # somewhere inside round 2 (round 1's checkpoint just landed)
    proc.wait()
    assert not (killed / 'global_model.pth').exists(), 'the run finished before it could be killed'
    ckpt = torch.load(killed / 'checkpoint.pt', weights_only=True)
    assert 1 <= ckpt['round'] < 3
    subprocess.run(main_cmd(data_dir, killed, '--resume'), cwd=ROOT, check=True, capture_output=True)
    whole = tmp_path / 'whole'
    subprocess.run(main_cmd(data_dir, whole), cwd=ROOT, check=True, capture_output=True)

    a = torch.load(killed / 'global_model.pth', weights_only=True)
    b = torch.load(whole / 'global_model.pth', weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (json.loads((d / 'training_history.json').read_text()) for d in (killed, whole))
    assert [(r['test_loss'], r['test_accuracy']) for r in ha['rounds']] == \
           [(r['test_loss'], r['test_accuracy']) for r in hb['rounds']]
    ua = torch.load(killed / 'captured_updates.pt', weights_only=True)
    ub = torch.load(whole / 'captured_updates.pt', weights_only=True)
    assert [r['round'] for r in ua['rounds']] == [1, 2, 3]
    for ra, rb in zip(ua['rounds'], ub['rounds']):
        for x, y in zip(ra['updates'], rb['updates']):
            assert all(torch.equal(x['delta'][k], y['delta'][k]) for k in x['delta'])
    assert not (killed / 'checkpoint.pt').exists()
    assert not [f for f in os.listdir(killed) if f.endswith('.tmp')]


def test_resume_refuses_other_settings_and_missing_checkpoint(idx_dir, tmp_path):
    with pytest.raises(UserError, match='nothing to resume'):
        train(tiny_config(idx_dir, tmp_path), log=QUIET, resume=True)
    cfg = tiny_config(idx_dir, tmp_path)
    train(cfg, log=QUIET)
    torch.save({'config': cfg, 'round': 1}, tmp_path / 'checkpoint.pt')
    with pytest.raises(UserError, match=r'different settings \(learning_rate=0.01 not 0.1\)'):
        train(tiny_config(idx_dir, tmp_path, learning_rate=0.1), log=QUIET, resume=True)


class RunsCode:
    def __reduce__(self):
        return (os.system, ('echo pwned > /dev/null',))


def test_code_executing_pickle_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'conv1.weight': RunsCode()}, f)
    with pytest.raises(UserError, match=r'cannot load model checkpoint .*evil.pth'):
        load_model(str(path))
    torch.save({'x': RunsCode()}, tmp_path / 'evil2.pth')  # the zip format torch itself writes
    with pytest.raises(UserError, match='cannot load model checkpoint'):
        load_model(str(tmp_path / 'evil2.pth'))


def test_other_architecture_is_refused_with_the_mismatch(tmp_path):
    torch.save({'conv1.weight': torch.zeros(16, 1, 5, 5)}, tmp_path / 'other.pth')
    with pytest.raises(UserError, match=r"is not the cnn its training history names, built for 28x28 images of "
                                        r"1 channel\(s\): missing \[.*'fc2.weight'.*conv1.weight is \(16, 1, 5, 5\)"):
        load_model(str(tmp_path / 'other.pth'))


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    from src.model import CNN
    torch.save(CNN().state_dict(), tmp_path / 'm.pth')
    blob = (tmp_path / 'm.pth').read_bytes()
    (tmp_path / 'm.pth').write_bytes(blob[:len(blob) // 2])
    with pytest.raises(UserError, match='cannot load model checkpoint'):
        load_model(str(tmp_path / 'm.pth'))
