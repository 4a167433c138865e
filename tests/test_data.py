import gzip
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

from src import data
from src.data import DataError, load_dataset, read_idx
from tests.conftest import idx_bytes, make_idx_dir, write_idx


def test_reads_gzip_and_raw_alike(tmp_path):
    gz = load_dataset('mnist', make_idx_dir(tmp_path / 'gz', compress=True), download=False)
    raw = load_dataset('mnist', make_idx_dir(tmp_path / 'raw', compress=False), download=False)
    assert gz.train_images.shape == (300, 28, 28) and gz.train_images.dtype == np.uint8
    assert gz.test_labels.shape == (100,)
    np.testing.assert_array_equal(gz.train_images, raw.train_images)
    np.testing.assert_array_equal(gz.test_labels, raw.test_labels)


def test_missing_file_names_it(tmp_path):
    d = make_idx_dir(tmp_path / 'd')
    os.remove(os.path.join(d, 't10k-labels-idx1-ubyte.gz'))
    with pytest.raises(DataError, match=r't10k-labels-idx1-ubyte.*file not found'):
        load_dataset('mnist', d, download=False)


def test_wrong_magic(tmp_path):
    path = tmp_path / 'x.gz'
    write_idx(path, np.zeros((3, 28, 28)))
    with pytest.raises(DataError, match='wrong magic'):
        read_idx(str(path), expect_ndim=1)  # an image file where labels are expected


def test_truncated_gzip(tmp_path):
    path = tmp_path / 'x.gz'
    write_idx(path, np.random.default_rng(0).integers(0, 255, (50, 28, 28)))
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(DataError, match=r'x\.gz: corrupt or truncated gzip'):
        read_idx(str(path), expect_ndim=3)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / 'x.gz'
    write_idx(path, np.random.default_rng(0).integers(0, 255, (50, 28, 28)))
    blob = bytearray(path.read_bytes())
    blob[30:60] = b'\xff' * 30
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match='x.gz'):
        read_idx(str(path), expect_ndim=3)


def test_truncated_raw_file(tmp_path):
    path = tmp_path / 'x'
    path.write_bytes(idx_bytes(np.zeros((10, 28, 28)))[:-5])
    with pytest.raises(DataError, match='does not match its header'):
        read_idx(str(path), expect_ndim=3)


def test_lying_header_is_refused_without_allocating(tmp_path):
    path = tmp_path / 'x.gz'
    with gzip.open(path, 'wb') as f:
        f.write(b'\x00\x00\x08\x03' + (4_000_000_000).to_bytes(4, 'big') + (28).to_bytes(4, 'big') * 2)
    with pytest.raises(DataError, match='corrupt header'):
        read_idx(str(path), expect_ndim=3)


def test_count_mismatch(tmp_path):
    d = make_idx_dir(tmp_path / 'd')
    write_idx(os.path.join(d, 'train-labels-idx1-ubyte.gz'), np.zeros(299))
    with pytest.raises(DataError, match='300 images but 299 labels'):
        load_dataset('mnist', d, download=False)


def test_label_out_of_range(tmp_path):
    d = make_idx_dir(tmp_path / 'd')
    write_idx(os.path.join(d, 'train-labels-idx1-ubyte.gz'), np.full(300, 12))
    with pytest.raises(DataError, match=r'train-labels-idx1-ubyte.gz: label 12 out of range 0-9'):
        load_dataset('mnist', d, download=False)


def test_any_image_size_and_class_count_in_a_local_idx_folder(tmp_path):
    """--dataset idx: 32x32 images of 12 classes (as EMNIST/KMNIST-style folders differ from MNIST) load, and
    the spec says so, with the training split's own normalisation."""
    d = tmp_path / 'd'
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for stem, n in (('train', 60), ('t10k', 20)):
        write_idx(os.path.join(d, f'{stem}-images-idx3-ubyte.gz'), rng.integers(0, 256, (n, 32, 30)))
        write_idx(os.path.join(d, f'{stem}-labels-idx1-ubyte.gz'), np.arange(n) % 12)
    data = load_dataset('idx', str(d))
    spec = data.spec
    assert spec.shape == (1, 32, 30) and spec.num_classes == 12
    x = data.train_images / 255
    assert spec.mean[0] == pytest.approx(x.mean(), abs=1e-4) and spec.std[0] == pytest.approx(x.std(), abs=1e-4)
    with pytest.raises(DataError, match='label 11 out of range 0-9'):  # a named dataset keeps its 10 classes
        load_dataset('mnist', str(d), download=False)
    with pytest.raises(DataError, match='--dataset idx reads a local IDX folder'):
        load_dataset('idx')


def test_absurd_image_size_is_a_corrupt_header(tmp_path):
    path = tmp_path / 'x.gz'
    write_idx(path, np.zeros((3, 0, 5)))
    with pytest.raises(DataError, match='corrupt header'):
        read_idx(str(path), expect_ndim=3)


def test_cifar10_binary_format(tmp_path):
    """The data_batch_*.bin files, in name order, and test_batch.bin: label byte + R, G, B planes."""
    from tests.conftest import make_cifar_dir, synthetic_colour_images
    d = make_cifar_dir(tmp_path / 'c', n_train=30, n_test=10, batches=3)
    data = load_dataset('cifar10', d)
    x, y = synthetic_colour_images(30, 0)
    assert data.train_images.shape == (30, 3, 32, 32) and data.train_images.dtype == np.uint8
    assert np.array_equal(data.train_images, x) and np.array_equal(data.train_labels, y)
    assert data.spec.shape == (3, 32, 32) and data.spec.num_classes == 10 and len(data.spec.mean) == 3
    nested = tmp_path / 'n'
    os.makedirs(nested)
    os.rename(d, nested / 'cifar-10-batches-bin')  # the folder the official archive unpacks to
    assert np.array_equal(load_dataset('cifar10', str(nested)).test_labels, data.test_labels)


@pytest.mark.parametrize('damage, message', [
    (lambda p: open(p, 'ab').write(b'x'), 'not a whole number of 3073-byte'),
    (lambda p: open(p, 'r+b').write(b'\x0c'), 'label 12 out of range 0-9'),
    (os.remove, 'needs data_batch_1.bin'),
])
def test_cifar10_corrupt_or_missing_files_are_one_error(tmp_path, damage, message):
    from tests.conftest import make_cifar_dir
    d = make_cifar_dir(tmp_path / 'c', n_train=20, n_test=10, batches=1)
    damage(os.path.join(d, 'test_batch.bin'))
    with pytest.raises(DataError, match=message):
        load_dataset('cifar10', d)


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server serving a folder of .gz files, standing in for a public mirror."""
    served = tmp_path / 'served'
    make_idx_dir(served)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f'http://127.0.0.1:{server.server_address[1]}/'
    server.shutdown()


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_checksum_and_loads(tmp_path, mirror, monkeypatch):
    served, url = mirror
    sums = {f.name: _md5(f) for f in served.iterdir()}
    monkeypatch.setitem(data.CHECKSUMS, 'mnist', sums)
    # the first mirror is dead: the downloader must fall through to the second
    monkeypatch.setitem(data.MIRRORS, 'mnist', ['http://127.0.0.1:9/', url])
    target = tmp_path / 'data'
    ds = load_dataset('mnist', str(target))
    assert ds.train_images.shape == (300, 28, 28)
    assert sorted(os.listdir(target)) == sorted(sums)  # nothing else left behind


def test_download_checksum_mismatch_leaves_nothing(tmp_path, mirror, monkeypatch):
    served, url = mirror
    sums = {f.name: _md5(f) for f in served.iterdir()}
    sums['train-images-idx3-ubyte.gz'] = '0' * 32
    monkeypatch.setitem(data.CHECKSUMS, 'mnist', sums)
    monkeypatch.setitem(data.MIRRORS, 'mnist', [url])
    target = tmp_path / 'data'
    with pytest.raises(DataError, match=r'train-images-idx3-ubyte.gz: missing, and download failed: .*checksum mismatch'):
        load_dataset('mnist', str(target))
    assert not os.path.exists(target)  # nothing left behind, not even the directory it made


def test_failed_download_keeps_a_directory_that_already_existed(tmp_path, mirror, monkeypatch):
    _, url = mirror
    monkeypatch.setitem(data.CHECKSUMS, 'mnist', {n: '0' * 32 for n in data.CHECKSUMS['mnist']})
    monkeypatch.setitem(data.MIRRORS, 'mnist', [url])
    target = tmp_path / 'mine'
    target.mkdir()
    with pytest.raises(DataError, match=r'checksum mismatch.*pass --data-dir'):
        load_dataset('mnist', str(target))
    assert target.is_dir() and os.listdir(target) == []  # the user's folder stays, and stays clean


def test_real_data_is_valid(real_data):
    mnist = load_dataset('mnist', os.path.join(real_data, 'mnist-10k'), download=False)
    assert mnist.train_images.shape == (8000, 28, 28) and mnist.test_images.shape == (2000, 28, 28)
    assert set(np.unique(mnist.train_labels)) == set(range(10))
    fashion = load_dataset('fashion-mnist', os.path.join(real_data, 'fashion-mnist'), download=False)
    assert fashion.train_images.shape == (60000, 28, 28) and fashion.test_labels.shape == (10000,)
