"""MNIST-style data: read IDX files (gzip or raw), download them with checksums, validate structure.

Images are returned as uint8 arrays (N, 28, 28) and labels as uint8 arrays (N,);
`to_tensor` turns images into float tensors in [0, 1], which is the model's input space
(no normalisation, so attacks reconstruct pixels directly).
"""
import gzip
import hashlib
import os
import shutil
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from src.utils import UserError, atomic_path

FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}

# MD5 of the official .gz archives; a download must match exactly.
CHECKSUMS = {
    'mnist': {
        'train-images-idx3-ubyte.gz': 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
        'train-labels-idx1-ubyte.gz': 'd53e105ee54ea40749a09fcbcd1e9432',
        't10k-images-idx3-ubyte.gz': '9fb629c4189551a2d022fa330f9573f3',
        't10k-labels-idx1-ubyte.gz': 'ec29112dd5afa0611ce80d1b7f02629c',
    },
    'fashion-mnist': {
        'train-images-idx3-ubyte.gz': '8d4fb7e6c68d591d4c3dfef9ec88bf0d',
        'train-labels-idx1-ubyte.gz': '25c81989df183df01b3e8a0aad5dffbe',
        't10k-images-idx3-ubyte.gz': 'bef4ecab320f06d8554ea6380940ec79',
        't10k-labels-idx1-ubyte.gz': 'bb300cfdad3c16e7a12a480ee83cd310',
    },
}

MIRRORS = {
    'mnist': ['https://ossci-datasets.s3.amazonaws.com/mnist/',
              'https://storage.googleapis.com/cvdf-datasets/mnist/'],
    'fashion-mnist': ['http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'],
}

NUM_CLASSES = 10
MAX_ITEMS = 1_000_000  # far above MNIST's 60,000; a header claiming more is lying


class DataError(UserError):
    pass


@dataclass
class Dataset:
    name: str
    train_images: np.ndarray  # uint8 (N, 28, 28)
    train_labels: np.ndarray  # uint8 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray


def to_tensor(images, device='cpu'):
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(np.asarray(images)).to(device).unsqueeze(1).float().div_(255)


def _read_exact(f, n, path, chunk=1 << 20):
    """Read exactly n bytes in chunks into one growing buffer: memory follows the bytes really there, not
    a header's claim, and each byte is held once (a list of chunks joined at the end would hold it twice)."""
    data = bytearray()
    while len(data) < n:
        part = f.read(min(chunk, n - len(data)))
        if not part:
            raise DataError(f'{path}: truncated file (expected {n} bytes of data, got {len(data)})')
        data += part
    return data


def read_idx(path, expect_ndim):
    """Read one IDX file of unsigned bytes, checking its magic number, dimensions and size."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: file not found')
    with open(path, 'rb') as raw:
        is_gzip = raw.read(2) == b'\x1f\x8b'
    opener = gzip.open if is_gzip else open
    try:
        with opener(path, 'rb') as f:
            header = _read_exact(f, 4, path)
            if header[:3] != b'\x00\x00\x08' or header[3] != expect_ndim:
                raise DataError(f'{path}: wrong magic number 0x{header.hex()} '
                                f'(expected 0x0000080{expect_ndim}: unsigned bytes, {expect_ndim} dimensions)')
            dims = np.frombuffer(_read_exact(f, 4 * expect_ndim, path), dtype='>u4').astype(np.int64)
            if dims[0] > MAX_ITEMS:
                raise DataError(f'{path}: header claims {dims[0]} items (more than {MAX_ITEMS}): corrupt header')
            if expect_ndim == 3 and tuple(dims[1:]) != (28, 28):
                raise DataError(f'{path}: images are {dims[1]}x{dims[2]}, expected 28x28')
            n = int(np.prod(dims))
            if not is_gzip and os.path.getsize(path) != 4 + 4 * expect_ndim + n:
                raise DataError(f'{path}: file size {os.path.getsize(path)} does not match its header '
                                f'({4 + 4 * expect_ndim + n} bytes)')
            data = _read_exact(f, n, path)
            if f.read(1):
                raise DataError(f'{path}: trailing bytes after the {n} its header declares')
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f'{path}: corrupt or truncated gzip ({e})') from None
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e})') from None
    return np.frombuffer(data, dtype=np.uint8).reshape(tuple(dims))  # a bytearray: writable, for torch


def find_file(data_dir, stem):
    for name in (stem + '.gz', stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def md5sum(path):
    h = hashlib.md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _first_missing_dir(path):
    """The outermost directory of `path` that does not exist yet (None if it all exists)."""
    missing = None
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def download_file(filename, data_dir, mirrors, md5, timeout=60):
    """Fetch `filename` from the first mirror whose copy matches `md5`; write it atomically.

    If every mirror fails, directories this call created are removed again when they hold no
    file, so a failed download leaves nothing behind.
    """
    created = _first_missing_dir(data_dir)
    errors = []
    for base in mirrors:
        url = base + filename
        try:
            with atomic_path(os.path.join(data_dir, filename)) as tmp:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, 'wb') as out:
                    shutil.copyfileobj(response, out)
                got = md5sum(tmp)
                if got != md5:
                    raise ValueError(f'checksum mismatch (md5 {got}, expected {md5})')
            return os.path.join(data_dir, filename)
        except Exception as e:  # network errors and bad checksums alike: try the next mirror
            errors.append(f'{url}: {e}')
    if created and not any(files for _, _, files in os.walk(created)):
        shutil.rmtree(created)
    raise DataError(f'{os.path.join(data_dir, filename)}: missing, and download failed: ' + '; '.join(errors)
                    + ' (offline? pass --data-dir with a folder holding the four IDX files)')


def load_dataset(name='mnist', data_dir=None, download=True):
    """Load the four IDX files from `data_dir` (default data/<name>), downloading missing ones."""
    if name not in CHECKSUMS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(CHECKSUMS)}")
    data_dir = data_dir or os.path.join('data', name)
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        kind = 'a broken or looping link' if os.path.islink(data_dir) else 'not a folder'
        raise DataError(f'{data_dir}: {kind}; --data-dir must name a folder holding the four IDX files')
    arrays = {}
    for key, stem in FILES.items():
        path = find_file(data_dir, stem)
        if path is None:
            if not download:
                raise DataError(f'{os.path.join(data_dir, stem)}[.gz]: file not found')
            path = download_file(stem + '.gz', data_dir, MIRRORS[name], CHECKSUMS[name][stem + '.gz'])
        arrays[key] = read_idx(path, expect_ndim=3 if key.endswith('images') else 1)
    for split in ('train', 'test'):
        images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
        if len(images) != len(labels):
            raise DataError(f'{data_dir}: {split} split has {len(images)} images but {len(labels)} labels')
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise DataError(f'{find_file(data_dir, FILES[split + "_labels"])}: label {labels.max()} '
                            f'out of range 0-{NUM_CLASSES - 1}')
        if len(labels) == 0:
            raise DataError(f'{data_dir}: {split} split is empty')
    return Dataset(name, **arrays)
