"""Fuzz the IDX reader: any file either reads as a valid array or raises DataError, quickly."""
import gzip
import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from src.data import DataError, read_idx
from tests.conftest import idx_bytes

FUZZ_EXAMPLES = int(os.environ.get('FUZZ_EXAMPLES', 300))
VALID = {3: idx_bytes(np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256), 1: idx_bytes(np.arange(7) % 10)}


def check(blob, ndim, compress):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'f.gz' if compress else 'f')
        with (gzip.open(path, 'wb') if compress else open(path, 'wb')) as f:
            f.write(blob)
        try:
            array = read_idx(path, expect_ndim=ndim)
        except DataError as e:
            assert str(e).startswith(path)  # the one line names the file
            return
        assert array.dtype == np.uint8 and array.ndim == ndim
        if ndim == 3:
            assert array.shape[1:] == (28, 28)


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


@settings(max_examples=FUZZ_EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.booleans())
def test_mutated_files(case, compress):
    check(case[0], case[1], compress)


@settings(max_examples=FUZZ_EXAMPLES, deadline=2000)
@given(st.binary(max_size=256), st.sampled_from([1, 3]), st.booleans())
def test_random_files(blob, ndim, compress):
    check(blob, ndim, compress)


@settings(max_examples=FUZZ_EXAMPLES // 3, deadline=2000)
@given(st.binary(min_size=2, max_size=200))
def test_random_bytes_after_gzip_magic(blob):
    """Raw bytes that start like gzip but are not: the corrupt-gzip path."""
    check_raw = b'\x1f\x8b' + blob
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'f.gz')
        with open(path, 'wb') as f:
            f.write(check_raw)
        try:
            read_idx(path, expect_ndim=3)
        except DataError:
            pass
