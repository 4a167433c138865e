"""Fuzz the IDX reader against an independent oracle, quickly.

For every file the oracle below (a from-the-spec parser of the decompressed bytes) decides
whether it is a valid IDX file of unsigned bytes with the expected dimensions. A valid file
must read back as exactly the array it holds; an invalid one must raise DataError whose
message is one line and starts with the file's path. Neither side may silently pass.
"""
import gzip
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from src.data import MAX_ITEMS, DataError, read_idx
from tests.conftest import idx_bytes

FUZZ_EXAMPLES = int(os.environ.get('FUZZ_EXAMPLES', 300))
VALID = {3: idx_bytes(np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256), 1: idx_bytes(np.arange(7) % 10)}


def oracle(blob, ndim):
    """The array a valid IDX file `blob` (decompressed bytes) holds, or None if it is not valid."""
    head = 4 + 4 * ndim
    if len(blob) < head or blob[:4] != bytes([0, 0, 8, ndim]):
        return None
    dims = struct.unpack(f'>{ndim}I', blob[4:head])
    if dims[0] > MAX_ITEMS or (ndim == 3 and dims[1:] != (28, 28)):
        return None
    if len(blob) != head + int(np.prod(dims, dtype=np.int64)):
        return None
    return np.frombuffer(blob[head:], dtype=np.uint8).reshape(dims)


def write(d, blob, compress):
    path = os.path.join(d, 'f.gz' if compress else 'f')
    with (gzip.open(path, 'wb') if compress else open(path, 'wb')) as f:
        f.write(blob)
    return path


def assert_refused(path, ndim):
    with pytest.raises(DataError) as info:
        read_idx(path, expect_ndim=ndim)
    message = str(info.value)
    assert message.startswith(path + ':'), message  # names the file
    assert '\n' not in message and '\r' not in message, message  # one line
    assert len(message) > len(path) + 2  # and says something about it


def check(blob, ndim, compress):
    """Returns whether the file was valid, after asserting read_idx agrees with the oracle."""
    expected = oracle(blob, ndim)
    with tempfile.TemporaryDirectory() as d:
        path = write(d, blob, compress)
        if expected is None:
            assert_refused(path, ndim)
            return False
        array = read_idx(path, expect_ndim=ndim)
        assert array.dtype == np.uint8 and array.shape == expected.shape
        assert np.array_equal(array, expected)
        return True


@st.composite
def mutated(draw):
    ndim = draw(st.sampled_from([1, 3]))
    blob = bytearray(VALID[ndim])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(['flip', 'truncate', 'extend', 'header']))
        if kind == 'flip' and blob:
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        elif kind == 'truncate':
            del blob[draw(st.integers(0, len(blob))):]
        elif kind == 'extend':
            blob += draw(st.binary(max_size=64))
        elif kind == 'header' and len(blob) >= 8:
            blob[4:8] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, 'big')  # a lying item count
    return bytes(blob), ndim


# explicit cases on both sides of each check, so every run covers them whatever hypothesis draws
@settings(max_examples=FUZZ_EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.booleans())
@example((VALID[3], 3), False)                                  # untouched: valid
@example((VALID[1][:-1] + b'\xff', 1), True)                    # a data byte changed: still valid
@example((VALID[1] + b'\x00', 1), False)                        # one trailing byte
@example((VALID[1] + b'\x00', 1), True)
@example((VALID[1][:-1], 1), False)                             # one byte short
@example((VALID[1][:-1], 1), True)
@example((VALID[3][:4] + (3).to_bytes(4, 'big') + VALID[3][8:], 3), True)   # claims 3 images, holds 2
@example((VALID[1][:4] + (MAX_ITEMS + 1).to_bytes(4, 'big'), 1), True)       # lying count, no data
@example((b'\x00\x00\x08\x01' + (0).to_bytes(4, 'big'), 1), True)           # empty but well formed
@example((b'\x00\x00\x09' + VALID[1][3:], 1), False)            # signed-byte type code
@example((VALID[1], 3), True)                                   # wrong number of dimensions
def test_mutated_files(case, compress):
    check(case[0], case[1], compress)


@settings(max_examples=FUZZ_EXAMPLES, deadline=2000)
@given(st.binary(max_size=256), st.sampled_from([1, 3]), st.booleans())
def test_random_files(blob, ndim, compress):
    check(blob, ndim, compress)


@settings(max_examples=max(1, FUZZ_EXAMPLES // 3), deadline=2000)
@given(st.binary(min_size=2, max_size=200))
def test_random_bytes_after_gzip_magic(blob):
    """Raw bytes that start like gzip but are not: the corrupt-gzip path must refuse them in one line."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'f.gz')
        with open(path, 'wb') as f:
            f.write(b'\x1f\x8b' + blob)
        assert_refused(path, 3)


@settings(max_examples=max(1, FUZZ_EXAMPLES // 6), deadline=2000)
@given(st.integers(0, 5), st.sampled_from([1, 3]), st.booleans(), st.randoms(use_true_random=False))
def test_valid_files_round_trip_exactly(n, ndim, compress, rnd):
    """Any well-formed file, gzip or raw, reads back as the very array written (values, shape, dtype)."""
    shape = (n, 28, 28) if ndim == 3 else (n,)
    array = np.frombuffer(rnd.randbytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)
    with tempfile.TemporaryDirectory() as d:
        path = write(d, idx_bytes(array), compress)
        got = read_idx(path, expect_ndim=ndim)
    assert got.dtype == np.uint8 and got.shape == shape and np.array_equal(got, array)


def test_missing_file_is_one_line(tmp_path):
    assert_refused(str(tmp_path / 'absent.gz'), 1)


@pytest.mark.parametrize('compress', [False, True])
def test_item_count_limit_is_inclusive(tmp_path, compress):
    """MAX_ITEMS labels are a valid file; one more is refused as a lying header, even with the data there."""
    labels = np.arange(MAX_ITEMS, dtype=np.int64).astype(np.uint8)
    assert check(idx_bytes(labels), 1, compress)
    blob = idx_bytes(np.zeros(MAX_ITEMS + 1, np.uint8))
    assert not check(blob, 1, compress)
    path = write(str(tmp_path), blob, compress)
    with pytest.raises(DataError, match='corrupt header'):
        read_idx(path, expect_ndim=1)
