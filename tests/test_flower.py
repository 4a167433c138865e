"""The Flower engine runs the same experiment as the built-in one: in Flower's simulation engine (Ray) and
as a real deployment (a SuperLink and two SuperNodes on loopback, driven by `flwr run`).

Flower is optional (requirements-flower.txt): without it these tests skip, except the check that the
built-in engine never imports it.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from src.attacks.target import load_attack_inputs
from src.model import CNN, param_shapes
from src.records import load_captured
from src.federated import train
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda *a: None  # noqa: E731


def needs_flower():
    pytest.importorskip('flwr', reason='Flower is optional: pip install -r requirements-flower.txt')


def assert_same_run(dir_a, dir_b, atol):
    """Same history fields and numbers, same global model, same captured updates (up to `atol`)."""
    ha = json.loads((dir_a / 'training_history.json').read_text())
    hb = json.loads((dir_b / 'training_history.json').read_text())
    assert set(ha) == set(hb)
    assert ha['partition'] == hb['partition'] and ha['clients'] == hb['clients']
    assert [r['test_accuracy'] for r in ha['rounds']] == pytest.approx([r['test_accuracy'] for r in hb['rounds']],
                                                                      abs=1e-9)
    assert [r['test_loss'] for r in ha['rounds']] == pytest.approx([r['test_loss'] for r in hb['rounds']], rel=1e-5)
    ma = torch.load(dir_a / 'global_model.pth', weights_only=True)
    mb = torch.load(dir_b / 'global_model.pth', weights_only=True)
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=atol)
    ra, rb = (load_captured(str(d / 'captured_updates.pt'), param_shapes(CNN())) for d in (dir_a, dir_b))
    assert ra['meta'] == rb['meta']
    assert [r['round'] for r in ra['rounds']] == [r['round'] for r in rb['rounds']]
    for xa, xb in zip(ra['rounds'], rb['rounds']):
        for k in xa['global_state']:
            torch.testing.assert_close(xa['global_state'][k], xb['global_state'][k], rtol=0, atol=atol)
        assert [(u['client'], u['num_samples']) for u in xa['updates']] == \
               [(u['client'], u['num_samples']) for u in xb['updates']]
        for ua, ub in zip(xa['updates'], xb['updates']):
            assert set(ua['delta']) == set(ub['delta'])
            for k in ua['delta']:
                torch.testing.assert_close(ua['delta'][k], ub['delta'][k], rtol=0, atol=atol)


def test_builtin_engine_never_imports_flower(idx_dir, tmp_path):
    code = ('import sys, main; main.main(["--config", "quick", "--rounds", "1", "--local-epochs", "1", '
            f'"--data-dir", {idx_dir!r}, "--output-dir", {str(tmp_path)!r}, "--device", "cpu"]); '
            'assert not [m for m in sys.modules if m.split(".")[0] in ("flwr", "ray")], "flwr imported"')
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, capture_output=True)
    assert (tmp_path / 'global_model.pth').exists()


def test_simulation_engine_matches_builtin(idx_dir, tmp_path):
    needs_flower()
    pytest.importorskip('ray', reason="Flower's simulation engine needs its extra: pip install 'flwr[simulation]'")
    # fp32: bf16 autocast would round differently under the clients' thread counts
    settings = dict(num_rounds=2, local_epochs=1, num_clients=3, precision='fp32', data_distribution='non_iid')
    builtin = train(tiny_config(idx_dir, tmp_path / 'builtin', **settings), log=QUIET)
    from src.flower_engine import train_flower
    flower = train_flower(tiny_config(idx_dir, tmp_path / 'flower', engine='flower', **settings), log=QUIET)
    assert flower['config']['engine'] == 'flower' and 'flwr' in flower['versions']
    assert flower['final_test_accuracy'] == builtin['final_test_accuracy']
    # Ray's actors run torch on 1 thread, the built-in engine on all cores: float sums may differ in the last bit
    assert_same_run(tmp_path / 'builtin', tmp_path / 'flower', atol=1e-6)
    _, private = load_attack_inputs(str(tmp_path / 'flower' / 'global_model.pth'), device='cpu')  # as attacks load it
    assert len(private.client_indices) == 3


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, log, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f'process exited with {proc.returncode}:\n{log.read_text()[-3000:]}')
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f'nothing listens on port {port} after {timeout} s:\n{log.read_text()[-3000:]}')


def stop(procs):
    """SIGTERM each process group (the process and the SuperExec/app processes it started), then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    time.sleep(0.5)
    for p in procs:  # children of the group must be gone too
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_deployment_superlink_and_two_supernodes_on_loopback(idx_dir, tmp_path):
    needs_flower()
    home = tmp_path / 'flwr_home'
    home.mkdir()
    link_port = free_port()
    # the Flower configuration names the SuperLink connection `flwr run` submits to
    (home / 'config.toml').write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), PYTHONPATH=ROOT, FLWR_TELEMETRY_ENABLED='0')
    procs = []

    def start(name, cmd):
        log = tmp_path / f'{name}.log'
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1], log

    try:
        link, link_log = start('superlink', ['flower-superlink', '--insecure', '--port', str(link_port),
                                             '--disable-runtime-dependency-installation'])
        wait_for_port(link_port, link, link_log)
        for c in range(2):
            port = free_port()
            node, node_log = start(f'supernode{c}', [
                'flower-supernode', '--insecure', '--superlink', f'127.0.0.1:{link_port}', '--port', str(port),
                '--node-config', f'partition-id={c} num-partitions=2'])
            wait_for_port(port, node, node_log)
        out = tmp_path / 'deployed'
        run_config = (f"preset='quick' num-clients=2 num-rounds=2 local-epochs=1 precision='fp32' device='cpu' "
                      f"data-dir='{idx_dir}' output-dir='{out}'")
        result = subprocess.run(['flwr', 'run', os.path.join(ROOT, 'flower_app'), 'loopback', '--stream',
                                 '--run-config', run_config], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert (out / 'training_history.json').exists(), result.stdout[-3000:]
    finally:
        stop(procs)
    assert all(p.poll() is not None for p in procs)
    history = json.loads((out / 'training_history.json').read_text())
    assert [r['round'] for r in history['rounds']] == [1, 2]
    record = load_captured(str(out / 'captured_updates.pt'), param_shapes(CNN()))
    assert [[u['client'] for u in r['updates']] for r in record['rounds']] == [[0, 1], [0, 1]]
    # two real processes exchanging weights over the network train exactly what the built-in engine trains
    train(tiny_config(idx_dir, tmp_path / 'builtin', num_clients=2, num_rounds=2, local_epochs=1, precision='fp32'),
          log=QUIET)
    assert_same_run(tmp_path / 'builtin', out, atol=1e-6)
