import numpy as np
import pytest

from src.partition import partition
from src.utils import UserError

LABELS = np.repeat(np.arange(10), 100)[np.random.default_rng(0).permutation(1000)]


def assert_disjoint_complete(parts, n=len(LABELS)):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == n


@pytest.mark.parametrize('clients', [1, 3, 5, 7])
def test_iid_equal_parts(clients):
    parts = partition(LABELS, clients, 'iid', seed=1)
    assert_disjoint_complete(parts)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize('clients', [5, 7, 10])
def test_non_iid_two_classes_each_all_data_used(clients):
    parts = partition(LABELS, clients, 'non_iid', seed=1)
    assert_disjoint_complete(parts)
    for p in parts:
        assert len(np.unique(LABELS[p])) == 2


def test_non_iid_few_clients_cover_two_classes_each():
    parts = partition(LABELS, 3, 'non_iid', seed=1)
    held = [set(np.unique(LABELS[p]).tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    assert len(set().union(*held)) == 6  # 3 clients x 2 distinct classes
    covered = np.isin(LABELS, sorted(set().union(*held)))
    assert sum(len(p) for p in parts) == covered.sum()  # every image of a held class is used


def test_shards_use_every_image():
    parts = partition(LABELS, 5, 'shards', seed=2)
    assert_disjoint_complete(parts)
    assert all(len(np.unique(LABELS[p])) <= 4 for p in parts)


def test_dirichlet_complete_and_skewed():
    parts = partition(LABELS, 5, 'dirichlet', seed=3, alpha=0.1)
    assert_disjoint_complete(parts)
    assert min(len(p) for p in parts) >= 10
    shares = np.array([np.bincount(LABELS[p], minlength=10) for p in parts]) / 100
    assert shares.max(axis=0).mean() > 0.6  # small alpha: most of a class sits with one client


@pytest.mark.parametrize('dist', ['iid', 'non_iid', 'shards', 'dirichlet'])
def test_reproducible_from_seed(dist):
    a = partition(LABELS, 5, dist, seed=7)
    b = partition(LABELS, 5, dist, seed=7)
    c = partition(LABELS, 5, dist, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_unknown_distribution():
    with pytest.raises(UserError, match='unknown data distribution'):
        partition(LABELS, 5, 'weird', seed=0)
