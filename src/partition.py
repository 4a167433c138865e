"""Split training indices among clients: iid, non_iid (two classes each), shards, dirichlet.

Every function takes a numpy Generator so the split is reproducible from the seed.
"""
import numpy as np

from src.utils import UserError

DISTRIBUTIONS = ('iid', 'non_iid', 'shards', 'dirichlet')


def iid(labels, num_clients, rng):
    """Uniform random split into equal parts (sizes differ by at most one)."""
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def classes_per_client(num_clients, num_classes, rng, k=2):
    """Deal k distinct classes to each client so that as many classes as possible are covered.

    Client c gets slots k*c .. k*c+k-1 of a seeded cyclic class order: consecutive slots in
    a cycle are distinct classes, and 2 clients * 5 = 10 slots cover every class once.
    """
    order = rng.permutation(num_classes)
    return [[int(order[(k * c + j) % num_classes]) for j in range(k)] for c in range(num_clients)]


def non_iid(labels, num_clients, rng, k=2):
    """Each client holds exactly k classes; each class's images are split among its holders."""
    num_classes = int(labels.max()) + 1
    held = classes_per_client(num_clients, num_classes, rng, k)
    parts = [[] for _ in range(num_clients)]
    for cls in range(num_classes):
        holders = [c for c in range(num_clients) if cls in held[c]]
        if not holders:
            continue
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for c, chunk in zip(holders, np.array_split(idx, len(holders))):
            parts[c].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def shards(labels, num_clients, rng, shards_per_client=2):
    """McMahan et al. 2017: sort by label, cut into equal shards, give each client two at random."""
    order = np.argsort(labels, kind='stable')
    pieces = np.array_split(order, num_clients * shards_per_client)
    assignment = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assignment]


def dirichlet(labels, num_clients, rng, alpha, min_size=10, max_tries=100):
    """Hsu et al. 2019: each class is split among clients by proportions drawn from Dir(alpha).

    Redrawn (as in the usual implementations) until every client holds at least `min_size`
    images, so that no client is empty.
    """
    num_classes = int(labels.max()) + 1
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
        parts = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise UserError(f'dirichlet split with alpha={alpha} left a client with fewer than {min_size} images '
                    f'after {max_tries} draws: raise --alpha or lower --clients')


def partition(labels, num_clients, distribution, seed, alpha=0.5):
    """Client index arrays for `labels` under `distribution`, reproducible from `seed`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if distribution == 'iid':
        return iid(labels, num_clients, rng)
    if distribution == 'non_iid':
        return non_iid(labels, num_clients, rng)
    if distribution == 'shards':
        return shards(labels, num_clients, rng)
    if distribution == 'dirichlet':
        return dirichlet(labels, num_clients, rng, alpha)
    raise UserError(f"unknown data distribution {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
