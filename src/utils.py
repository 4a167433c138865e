"""Small shared helpers: errors, atomic file writes, devices and seeds."""
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm


class UserError(Exception):
    """Bad input a user can fix (data, settings, files); scripts print it as one line."""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A crash mid-write leaves the old file (or nothing) under the final name, never a
    truncated one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should be as readable as any file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


OUTPUT_MARKER = '.fl-privacy-output.json'  # written into every folder a tool replaces whole


def _read_marker(folder):
    try:
        with open(os.path.join(folder, OUTPUT_MARKER)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) and isinstance(marker.get('files'), list) else None
    except (OSError, ValueError):
        return None


def _probe_writable(folder, flag, shown):
    """Write a file in `folder` (or, if it does not exist yet, in its nearest existing parent, where it
    would be created), so an unwritable output `shown` fails now, not after the work; nothing is left."""
    where = folder
    while not os.path.lexists(where):
        where = os.path.dirname(where)
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix='.write-probe-')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f'{flag} {shown}: cannot be written ({e.strerror or e})') from None


def check_output_dir(path, tool, replace=False, flag='--output-dir'):
    """Refuse, before any work starts, an output folder that `tool` must not write to.

    Tools that write files into a folder (replace=False) refuse a path that is a file or lies under
    one, cannot be written, or is a results folder another tool replaces whole. Tools that replace the
    folder whole (replace=True) also refuse any folder that is neither empty nor one an earlier run of
    the same tool created (its marker lists every file it wrote): a user's files are never deleted.
    """
    path = os.path.abspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path}: is a file (or a broken link), not a folder; name a folder')
    ancestor = os.path.dirname(path)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f'{flag} {path}: lies under {ancestor}, which is a file, not a folder')
    if os.path.isdir(path):
        marker = _read_marker(path)
        owner = marker.get('tool') if marker else None
        if replace:
            entries = sorted(os.listdir(path))
            if entries and owner != tool:
                raise UserError(f'{flag} {path}: holds files that {tool} did not write ({", ".join(entries[:3])}'
                                f'{", ..." if len(entries) > 3 else ""}); the folder is replaced whole at the end '
                                f'of a run, so name a new or empty folder')
            foreign = sorted(set(entries) - {OUTPUT_MARKER} - set(marker['files'])) if marker else []
            if foreign:
                raise UserError(f'{flag} {path}: holds files that {tool} did not write ({", ".join(foreign[:3])}); '
                                f'the folder is replaced whole at the end of a run: move them or name another folder')
        elif owner is not None and owner != tool:
            raise UserError(f'{flag} {path}: is a results folder of {owner}, which replaces it whole on its next run; '
                            f'name another folder')
    _probe_writable(os.path.dirname(path) if replace else path, flag, path)
    return path


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_siblings(path):
    """Staging and old-results folders that a killed run of this path left behind."""
    parent, base = os.path.dirname(path), os.path.basename(path)
    for name in os.listdir(parent):
        for kind in ('staging', 'old'):
            prefix = f'.{base}.{kind}-'
            if name.startswith(prefix):
                pid = name[len(prefix):].split('-')[0]
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path, tool):
    """Yield a fresh staging folder beside `path`; on success swap it in for `path` whole.

    A crash mid-run leaves the previous results untouched, never a mix of old and new files under
    `path`; its staging folder is removed by the next run. Only an empty folder or one that `tool`
    created earlier is ever replaced (check_output_dir); the new one gets a marker listing its files.
    """
    path = check_output_dir(path, tool, replace=True)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_siblings(path)
    staging = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.staging-{os.getpid()}-')
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        save_json({'tool': tool, 'files': sorted(os.listdir(staging))}, os.path.join(staging, OUTPUT_MARKER))
        check_output_dir(path, tool, replace=True)  # still ours (or gone) after the run
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.old-{os.getpid()}-')
            os.rmdir(old)
            os.replace(path, old)
        os.replace(staging, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def finite_json(obj, path=''):
    """(obj with every non-finite float replaced by None, {dotted path: 'nan'|'inf'|'-inf'})."""
    bad = {}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k], b = finite_json(v, f'{path}.{k}' if path else str(k))
            bad.update(b)
        return out, bad
    if isinstance(obj, (list, tuple)):
        out = []
        for i, v in enumerate(obj):
            item, b = finite_json(v, f'{path}[{i}]')
            out.append(item)
            bad.update(b)
        return out, bad
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, {path: 'nan' if obj != obj else ('inf' if obj > 0 else '-inf')}
    return obj, bad


def save_json(obj, path):
    """Strict JSON, written atomically: non-finite numbers become null, listed under 'non_finite'."""
    obj, bad = finite_json(obj)
    if bad and isinstance(obj, dict):
        obj['non_finite'] = bad  # path -> 'nan' | 'inf' | '-inf': what the null there stood for
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write('\n')


def save_torch(obj, path):
    """torch.save, atomically and byte-reproducibly: the archive's inner name is fixed ('archive'), not
    derived from the temporary file's random name, so identical content gives identical files."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(buf.getbuffer())


def load_torch(path, what='file'):
    """torch.load without executing code; any failure becomes one clear UserError."""
    if not os.path.isfile(path):
        raise UserError(f'{what} not found: {path}')
    try:
        # sparse tensors' indices are checked on load: an out-of-range one would crash the process later
        with torch.sparse.check_sparse_tensor_invariants():
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals, bad sparse indices
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'cannot load {what} {path}: {first_line[:200]}') from None


def load_cached(path, what, restore):
    """restore(saved) for the cache file at `path`, or None when there is none or it is not to be trusted.

    restore raises UserError (or fails on a missing key or a wrong shape) for a file that loads but
    does not check out; such a file, like one that does not load, is noted and then retrained over.
    """
    if not os.path.exists(path):
        return None
    try:
        return restore(load_torch(path, f'cached {what}'))
    except (UserError, KeyError, TypeError, RuntimeError, AttributeError, ValueError) as e:
        why = f'missing field {e}' if isinstance(e, KeyError) else str(e).strip().splitlines()[0][:200]
        tqdm.write(f'note: ignoring corrupt {what} cache {path} ({why}); retraining')
        return None


def sha256_of_arrays(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(memoryview(a.astype('int64', copy=False)).cast('B'))
    return h.hexdigest()


def state_digest(*states):
    """SHA-256 of state dicts' names and raw bytes: what a cache file records to detect tampering."""
    h = hashlib.sha256()
    for state in states:
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_device(name='auto'):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use 'auto', 'cpu' or 'cuda'") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'device {name!r} asked for, but CUDA is not available here: use --device cpu')
    return device


def _cpu_has_bf16():
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return 'amx_bf16' in flags or 'avx512_bf16' in flags


def resolve_precision(name, device):
    """bf16 autocast only where the hardware runs it natively; emulated bf16 is slower than fp32."""
    if name == 'auto':
        if device.type == 'cuda':
            return 'bf16' if torch.cuda.is_bf16_supported() else 'fp32'
        return 'bf16' if _cpu_has_bf16() else 'fp32'
    if name not in ('bf16', 'fp32'):
        raise UserError(f"unknown precision {name!r}: use 'auto', 'bf16' or 'fp32'")
    return name


def autocast(device, precision, cache_enabled=True):
    """bf16 autocast for precision 'bf16', else nothing (fp32). A CUDA graph's capture needs cache_enabled=False."""
    if precision == 'bf16':
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def capture_cuda_graph(step):
    """`step` captured in a CUDA graph, after warm-up runs on a side stream (as torch.cuda.graphs asks); the
    warm-up runs really run, so the caller undoes what they changed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def map_in_threads(fn, items, workers):
    """[fn(item) for item in items] on `workers` threads, each doing its arithmetic in one intra-op thread:
    on a CPU, independent small models train faster side by side than one after another on all cores."""
    if workers <= 1:
        return [fn(item) for item in items]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # new threads take this on their first operation
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def derive_seed(*parts):
    """A 63-bit seed from (seed, round, client, ...): independent of the order things run in."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1


MAX_SEED = 2 ** 63 - 1  # every RNG here (torch, numpy, derive_seed) accepts 0..MAX_SEED


def check_seed(seed, flag='--seed'):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f'{flag} {seed}: must be an integer from 0 to 2**63-1')
    return seed


def check_finite(values, flags):
    """Refuse NaN and infinite float settings, naming each one's flag: nothing can train on them."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f'{flags.get(key, key)} {value}: must be a finite number')
