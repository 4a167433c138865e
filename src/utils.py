"""Small shared helpers: errors, atomic file writes, devices and seeds."""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile

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


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh staging folder beside `path`; on success swap it in for `path` whole.

    A crash mid-run leaves the previous results untouched (plus a hidden staging folder),
    never a mix of old and new files under `path`.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(path) + '.staging-')
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(path) + '.old-')
            os.rmdir(old)
            os.replace(path, old)
        os.replace(staging, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def save_json(obj, path):
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


def save_torch(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path, what='file'):
    """torch.load without executing code; any failure becomes one clear UserError."""
    if not os.path.isfile(path):
        raise UserError(f'{what} not found: {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle errors, zip errors, refused globals
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
    except (UserError, KeyError, TypeError, RuntimeError) as e:
        tqdm.write(f'note: ignoring corrupt {what} cache {path} ({e}); retraining')
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


def derive_seed(*parts):
    """A 63-bit seed from (seed, round, client, ...): independent of the order things run in."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1
