"""Image datasets: IDX files (gzip or raw; MNIST and Fashion-MNIST downloaded with checksums, or any local IDX
folder: EMNIST, KMNIST, ...) and CIFAR-10's binary format, each validated on read.

Images are uint8 arrays, (N, H, W) for one channel or (N, C, H, W), and labels uint8 arrays (N,);
`to_tensor` turns images into float tensors (N, C, H, W) in [0, 1], which is the models' input space
(they normalise inside, so attacks reconstruct pixels directly). `Dataset.spec` is what models,
attacks and figures are built for: the image shape, the number of classes and the normalisation.
"""
import gzip
import hashlib
import os
import shutil
import urllib.request
import zlib
from dataclasses import dataclass
from functools import cached_property

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

MAX_ITEMS = 1_000_000  # far above MNIST's 60,000; a header claiming more is lying
MAX_SIDE = 1024  # image side in pixels


class DataError(UserError):
    pass


# The normalisation each model applies inside, per channel, for the named datasets (pixels in [0, 1]).
# Fashion-MNIST keeps the MNIST values every published number of this project was measured with (its own
# are 0.2860 / 0.3530); any fixed centring trains. A local IDX folder ('idx') uses its training split's.
STATS = {
    'mnist': ((0.1307,), (0.3081,)),
    'fashion-mnist': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
DATASETS = ('mnist', 'fashion-mnist', 'cifar10', 'idx')
CLASSES = {'mnist': 10, 'fashion-mnist': 10, 'cifar10': 10}


@dataclass(frozen=True)
class DatasetSpec:
    """What a model, an attack or a figure is built for, instead of MNIST's literals."""
    shape: tuple        # one image, (channels, height, width)
    num_classes: int
    mean: tuple         # per channel, of pixels in [0, 1]: the models normalise inside with these
    std: tuple

    @property
    def channels(self):
        return self.shape[0]

    def normalise(self, x):
        """(x - mean) / std per channel, x (N, C, H, W) in [0, 1]."""
        if len(self.mean) == 1:  # Python scalars: the arithmetic every published number was measured with
            return (x - self.mean[0]) / self.std[0]
        mean, std = self._per_channel(x)
        return (x - mean) / std

    def denormalise(self, z):
        """The pixels whose normalisation is z (N, C, H, W)."""
        mean, std = self._per_channel(z)
        return z * std + mean

    def _per_channel(self, x):
        return (torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1),
                torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1))

    def as_dict(self):
        return {'shape': list(self.shape), 'num_classes': self.num_classes, 'mean': list(self.mean),
                'std': list(self.std)}


MNIST_SPEC = DatasetSpec((1, 28, 28), 10, *STATS['mnist'])  # the original README's digits: the models' default


def image_shape(images):
    """(C, H, W) of one image of a uint8 array (N, H, W) or (N, C, H, W)."""
    return (1, *images.shape[1:]) if images.ndim == 3 else tuple(images.shape[1:])


@dataclass
class Dataset:
    name: str
    train_images: np.ndarray  # uint8 (N, H, W) or (N, C, H, W)
    train_labels: np.ndarray  # uint8 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray

    @cached_property
    def spec(self):
        if self.name in STATS:
            mean, std = STATS[self.name]
            classes = CLASSES[self.name]
        else:  # a local folder: its training split's statistics, and as many classes as its labels name
            x = self.train_images.reshape(len(self.train_images), *image_shape(self.train_images))
            pixels = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
            mean = tuple(round(float(c.mean(dtype=np.float64)) / 255, 4) for c in pixels)
            std = tuple(max(round(float(c.std(dtype=np.float64)) / 255, 4), 1e-3) for c in pixels)
            classes = int(max(self.train_labels.max(), self.test_labels.max())) + 1
        return DatasetSpec(image_shape(self.train_images), classes, mean, std)


def to_tensor(images, device='cpu'):
    """uint8 (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) in [0, 1]."""
    x = torch.from_numpy(np.asarray(images)).to(device)
    return (x.unsqueeze(1) if x.dim() == 3 else x).float().div_(255)


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
            if expect_ndim == 3 and (min(dims[1:]) < 1 or max(dims[1:]) > MAX_SIDE):
                raise DataError(f'{path}: images are {dims[1]}x{dims[2]}: corrupt header '
                                f'(sides 1 to {MAX_SIDE} pixels are read)')
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


CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue planes of a 32x32 image
MAX_CLASSES = 256


def read_cifar_binary(path):
    """One file of CIFAR-10's binary version: records of a label byte and 3072 pixel bytes (R, G, B planes).
    Returns (images uint8 (N, 3, 32, 32), labels uint8 (N,))."""
    try:
        size = os.path.getsize(path)
        if size == 0 or size % CIFAR_RECORD:
            raise DataError(f'{path}: {size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records '
                            f'(truncated or not the binary version)')
        with open(path, 'rb') as f:
            raw = np.frombuffer(bytearray(f.read()), dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e})') from None
    labels = raw[:, 0].copy()
    if labels.max() >= CLASSES['cifar10']:
        raise DataError(f'{path}: label {labels.max()} out of range 0-9 (not CIFAR-10\'s binary version?)')
    return raw[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def load_cifar10(data_dir):
    """data_batch_*.bin (the training split, in name order) and test_batch.bin from data_dir or its
    cifar-10-batches-bin/ (the folder the official archive unpacks to)."""
    nested = os.path.join(data_dir, 'cifar-10-batches-bin')
    folder = nested if os.path.isdir(nested) else data_dir
    train = sorted(f for f in os.listdir(folder) if f.startswith('data_batch_') and f.endswith('.bin'))
    test = os.path.join(folder, 'test_batch.bin')
    if not train or not os.path.isfile(test):
        raise DataError(f'{folder}: needs data_batch_1.bin ... and test_batch.bin, CIFAR-10\'s binary version '
                        f'(cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked; '
                        f'it is not downloaded here)')
    parts = [read_cifar_binary(os.path.join(folder, f)) for f in train]
    test_images, test_labels = read_cifar_binary(test)
    return {'train_images': np.concatenate([p[0] for p in parts]),
            'train_labels': np.concatenate([p[1] for p in parts]),
            'test_images': test_images, 'test_labels': test_labels}


def load_idx(name, data_dir, download):
    """The four IDX files from data_dir, downloading missing ones for the named datasets."""
    arrays = {}
    for key, stem in FILES.items():
        path = find_file(data_dir, stem)
        if path is None:
            if not download or name not in CHECKSUMS:
                raise DataError(f'{os.path.join(data_dir, stem)}[.gz]: file not found')
            path = download_file(stem + '.gz', data_dir, MIRRORS[name], CHECKSUMS[name][stem + '.gz'])
        arrays[key] = read_idx(path, expect_ndim=3 if key.endswith('images') else 1)
    if arrays['train_images'].shape[1:] != arrays['test_images'].shape[1:]:
        raise DataError(f'{data_dir}: train images are {arrays["train_images"].shape[1:]} pixels but test images '
                        f'{arrays["test_images"].shape[1:]}')
    return arrays


def load_dataset(name='mnist', data_dir=None, download=True):
    """The dataset `name` from `data_dir` (default data/<name>): MNIST and Fashion-MNIST as IDX files,
    downloaded (checksums verified) where missing; 'idx' any local IDX folder (--data-dir); 'cifar10'
    CIFAR-10's binary version from a local folder."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name == 'idx' and not data_dir:
        raise DataError('--dataset idx reads a local IDX folder: name it with --data-dir')
    data_dir = data_dir or os.path.join('data', name)
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        kind = 'a broken or looping link' if os.path.islink(data_dir) else 'not a folder'
        raise DataError(f'{data_dir}: {kind}; --data-dir must name a folder holding the dataset\'s files')
    if name == 'cifar10':
        if not os.path.isdir(data_dir):
            raise DataError(f'{data_dir}: no such folder; --data-dir must name the folder of CIFAR-10\'s .bin files')
        arrays = load_cifar10(data_dir)
    else:
        arrays = load_idx(name, data_dir, download)
    classes = CLASSES.get(name, MAX_CLASSES)
    for split in ('train', 'test'):
        images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
        if len(images) != len(labels):
            raise DataError(f'{data_dir}: {split} split has {len(images)} images but {len(labels)} labels')
        if len(labels) == 0:
            raise DataError(f'{data_dir}: {split} split is empty')
        if labels.max() >= classes:
            where = data_dir if name == 'cifar10' else find_file(data_dir, FILES[split + '_labels'])
            raise DataError(f'{where}: label {labels.max()} out of range 0-{classes - 1}')
    data = Dataset(name, **arrays)
    if data.spec.num_classes < 2:
        raise DataError(f'{data_dir}: its labels name one class only; a classifier needs at least 2')
    return data
