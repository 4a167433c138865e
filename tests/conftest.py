"""Shared fixtures: tiny IDX datasets written on the fly, so tests need no downloads and no ../shared."""
import gzip
import os
import struct
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tests use tiny tensors, where one thread is faster and immune to oversubscription.
torch.set_num_threads(1)


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    return struct.pack('>BBBB', 0, 0, 8, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


def write_idx(path, array, compress=True):
    data = idx_bytes(array)
    if compress:
        with gzip.open(path, 'wb') as f:
            f.write(data)
    else:
        with open(path, 'wb') as f:
            f.write(data)
    return path


def synthetic_digits(n, seed):
    """Learnable 28x28 images: class c lights a 6x6 block at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28))
    for i, c in enumerate(labels):
        r, col = 3 + 7 * (c // 4), 3 + 6 * (c % 4)
        images[i, r:r + 6, col:col + 6] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def make_idx_dir(directory, n_train=300, n_test=100, compress=True, seed=0):
    os.makedirs(directory, exist_ok=True)
    tr_x, tr_y = synthetic_digits(n_train, seed)
    te_x, te_y = synthetic_digits(n_test, seed + 1)
    suffix = '.gz' if compress else ''
    write_idx(os.path.join(directory, 'train-images-idx3-ubyte' + suffix), tr_x, compress)
    write_idx(os.path.join(directory, 'train-labels-idx1-ubyte' + suffix), tr_y, compress)
    write_idx(os.path.join(directory, 't10k-images-idx3-ubyte' + suffix), te_x, compress)
    write_idx(os.path.join(directory, 't10k-labels-idx1-ubyte' + suffix), te_y, compress)
    return str(directory)


def synthetic_colour_images(n, seed, size=32):
    """Learnable RGB images (N, 3, size, size): class c lights an 8x8 block of a class-specific colour at a
    class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 3, size, size))
    for i, c in enumerate(labels):
        r, col = 2 + 9 * (c // 4), 2 + 7 * (c % 4)
        images[i, c % 3, r:r + 8, col:col + 8] = 255
        images[i, (c + 1) % 3, r:r + 8, col:col + 8] = 60 * (c // 3)
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_cifar_bin(path, images, labels):
    """CIFAR-10's binary format: per image a label byte, then its red, green and blue 32x32 planes."""
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], 1)
    with open(path, 'wb') as f:
        f.write(records.tobytes())
    return path


def make_cifar_dir(directory, n_train=300, n_test=100, seed=0, batches=2):
    """A tiny CIFAR-10 binary folder: the training split over `batches` data_batch_*.bin files."""
    os.makedirs(directory, exist_ok=True)
    tr_x, tr_y = synthetic_colour_images(n_train, seed)
    te_x, te_y = synthetic_colour_images(n_test, seed + 1)
    for b, part in enumerate(np.array_split(np.arange(n_train), batches)):
        write_cifar_bin(os.path.join(directory, f'data_batch_{b + 1}.bin'), tr_x[part], tr_y[part])
    write_cifar_bin(os.path.join(directory, 'test_batch.bin'), te_x, te_y)
    return str(directory)


@pytest.fixture
def idx_dir(tmp_path):
    return make_idx_dir(tmp_path / 'tiny')


@pytest.fixture
def real_data():
    """The folder holding mnist-10k/ and fashion-mnist/ (FL_REAL_DATA), or skip."""
    root = os.environ.get('FL_REAL_DATA')
    if not root:
        pytest.skip('FL_REAL_DATA is not set (point it at a folder with mnist-10k/ and fashion-mnist/)')
    if not os.path.isdir(os.path.join(root, 'mnist-10k')):
        pytest.skip(f'FL_REAL_DATA={root} has no mnist-10k/')
    return root


def tiny_config(data_dir, out_dir, **overrides):
    import config
    cfg = config.resolve('quick', {'data_dir': data_dir, 'output_dir': str(out_dir), 'num_rounds': 2,
                                   'local_epochs': 1, 'num_clients': 3, 'device': 'cpu'})
    cfg.update(overrides)
    return cfg
