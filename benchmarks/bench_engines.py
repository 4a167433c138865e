"""Built-in engine against Flower's simulation engine (Ray) on the same experiment, in one run.

Each engine runs `main.py` in its own process; while it runs, its whole process tree (Ray's GCS,
raylet and client actors included) is polled every 0.1 s from /proc. Reported per engine: wall time,
peak of the tree's summed RSS (shared pages count once per process, so this over-counts what Ray
shares), the largest single process's peak RSS, the final accuracy, and
whether both engines ended with the same global model.

    python benchmarks/bench_engines.py --data-dir ../shared/data/mnist-10k [--config standard]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import spread  # noqa: E402

PAGE = os.sysconf('SC_PAGE_SIZE')


def process_tree(root):
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_bytes(pid):
    try:
        with open(f'/proc/{pid}/statm') as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def run_engine(engine, args, out_dir):
    cmd = [sys.executable, 'main.py', '--engine', engine, '--data-dir', args.data_dir, '--output-dir', out_dir,
           '--seed', str(args.seed)]
    if args.config:
        cmd += ['--config', args.config]
    if args.rounds:
        cmd += ['--rounds', str(args.rounds)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_tree = largest = 0
    while proc.poll() is None:
        rss = [rss_bytes(p) for p in process_tree(proc.pid)]
        peak_tree, largest = max(peak_tree, sum(rss)), max(largest, max(rss))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        sys.exit(f'{engine} engine failed:\n{stderr[-3000:]}')
    with open(os.path.join(out_dir, 'training_history.json')) as f:
        history = json.load(f)
    return {'wall_seconds': wall, 'peak_tree_rss_mb': peak_tree / 2**20,
            'largest_process_rss_mb': largest / 2**20,
            'final_test_accuracy': history['final_test_accuracy'], 'precision': history['precision']}


def compare_once(args):
    """Both engines on the same experiment: their results, after checking they ended with the same model."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ('builtin', 'flower'):
            results[engine] = run_engine(engine, args, os.path.join(tmp, engine))
            print(f"{engine:8s} wall {results[engine]['wall_seconds']:6.1f} s  "
                  f"peak tree RSS {results[engine]['peak_tree_rss_mb']:7.0f} MB  "
                  f"largest process {results[engine]['largest_process_rss_mb']:6.0f} MB  "
                  f"accuracy {results[engine]['final_test_accuracy']:.4f} ({results[engine]['precision']})",
                  flush=True)
        a = torch.load(os.path.join(tmp, 'builtin', 'global_model.pth'), weights_only=True)
        b = torch.load(os.path.join(tmp, 'flower', 'global_model.pth'), weights_only=True)
    print(f'largest weight difference between the two final models '
          f'{max((a[k] - b[k]).abs().max().item() for k in a):.2e}', flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True)
    p.add_argument('--config', default='quick', help='preset (default quick)')
    p.add_argument('--rounds', type=int, help='override the preset\'s rounds')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--repeats', type=int, default=3, help='runs of each engine, alternating (median and range)')
    args = p.parse_args()
    runs = {'builtin': [], 'flower': []}
    for _ in range(args.repeats):  # alternating, so drift of the shared host hits both engines alike
        for engine, result in compare_once(args).items():
            runs[engine].append(result)
    for key, unit in (('wall_seconds', 's'), ('peak_tree_rss_mb', 'MB')):
        b, f = ([r[key] for r in runs[e]] for e in ('builtin', 'flower'))
        print(f"{key}: builtin {spread(b, unit, 1)}, flower {spread(f, unit, 1)}, "
              f"flower / builtin {spread([y / x for x, y in zip(b, f)], 'x')}")
    print(f'({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; timings include process start-up)')


if __name__ == '__main__':
    main()
