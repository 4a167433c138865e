import numpy as np
import pytest

from src.partition import partition
from src.utils import UserError

LABELS = np.repeat(np.arange(10), 100)[np.random.default_rng(0).permutation(1000)]


def assert_disjoint_complete(parts, n=len(LABELS)):
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == n
    assert np.array_equal(np.sort(joined), np.arange(n))  # indices, each exactly once
    assert all(np.issubdtype(p.dtype, np.integer) and np.array_equal(p, np.sort(p)) for p in parts)


def class_counts(parts):
    return np.array([np.bincount(LABELS[p], minlength=10) for p in parts])


@pytest.mark.parametrize('clients', [1, 3, 5, 7])
def test_iid_equal_parts(clients):
    parts = partition(LABELS, clients, 'iid', seed=1)
    assert_disjoint_complete(parts)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    if clients > 1:  # a random split, not contiguous blocks of the index range
        assert not any(np.array_equal(p, np.arange(p[0], p[0] + len(p))) for p in parts)
        counts = class_counts(parts)
        assert (counts > 0).all()  # every client sees every class (each holds >= 142 of 1000)
        assert np.abs(counts - counts.sum(1, keepdims=True) / 10).max() < 25  # roughly in proportion


def test_iid_is_not_just_the_index_order():
    parts = partition(np.zeros(1000, dtype=int), 4, 'iid', seed=5)
    assert_disjoint_complete(parts)
    assert all(p.min() < 100 and p.max() > 900 for p in parts)  # every client draws from the whole range


@pytest.mark.parametrize('clients', [5, 7, 10])
def test_non_iid_two_classes_each_all_data_used(clients):
    parts = partition(LABELS, clients, 'non_iid', seed=1)
    assert_disjoint_complete(parts)
    counts = class_counts(parts)
    assert ((counts > 0).sum(1) == 2).all()  # exactly two classes per client
    holders = (counts > 0).sum(0)  # 2 * clients slots dealt cyclically over the 10 classes
    assert sorted(holders.tolist()) == sorted([2 * clients // 10 + (c < 2 * clients % 10) for c in range(10)])
    for c in range(10):  # each class is split evenly among the clients that hold it
        held = counts[:, c][counts[:, c] > 0]
        assert held.sum() == 100 and held.max() - held.min() <= 1


def test_non_iid_few_clients_cover_two_classes_each():
    parts = partition(LABELS, 3, 'non_iid', seed=1)
    held = [set(np.unique(LABELS[p]).tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    assert len(set().union(*held)) == 6  # 3 clients x 2 distinct classes
    covered = np.isin(LABELS, sorted(set().union(*held)))
    assert sum(len(p) for p in parts) == covered.sum()  # every image of a held class is used


@pytest.mark.parametrize('clients', [5, 7])
def test_shards_are_two_label_sorted_shards_each(clients):
    """McMahan et al.: sort by label, cut into 2K equal shards, two per client, each shard used once."""
    parts = partition(LABELS, clients, 'shards', seed=2)
    assert_disjoint_complete(parts)
    order = np.argsort(LABELS, kind='stable')
    shards = [set(s.tolist()) for s in np.array_split(order, 2 * clients)]
    used = []
    for p in parts:
        mine = [i for i, s in enumerate(shards) if s <= set(p.tolist())]
        assert len(mine) == 2 and len(p) == sum(len(shards[i]) for i in mine)
        used += mine
    assert sorted(used) == list(range(2 * clients))
    if clients == 5:  # 10 shards of 100 sorted labels: each shard is one whole class
        assert sorted(class_counts(parts)[class_counts(parts) > 0].tolist()) == [100] * 10


def test_dirichlet_complete_and_skewed():
    parts = partition(LABELS, 5, 'dirichlet', seed=3, alpha=0.1)
    assert_disjoint_complete(parts)
    assert min(len(p) for p in parts) >= 10
    shares = class_counts(parts) / 100
    assert shares.max(axis=0).mean() > 0.6  # small alpha: most of a class sits with one client
    flat = partition(LABELS, 5, 'dirichlet', seed=3, alpha=1000.0)
    assert_disjoint_complete(flat)
    flat_shares = class_counts(flat) / 100
    assert flat_shares.max(axis=0).mean() < 0.3  # large alpha: every class spread close to 1/5 each
    assert np.abs(flat_shares - 0.2).max() < 0.1


@pytest.mark.parametrize('seed', [1, 4])
def test_dirichlet_redraws_until_every_client_has_ten(seed):
    """With these seeds the first draw leaves a client with fewer than 10 images: the split must redraw."""
    parts = partition(LABELS, 10, 'dirichlet', seed=seed, alpha=0.1)
    assert_disjoint_complete(parts)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_impossible_is_refused():
    with pytest.raises(UserError, match='fewer than 10 images'):  # 11 clients x 10 > 100 images: no draw can work
        partition(LABELS[:100], 11, 'dirichlet', seed=0, alpha=100.0)


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
