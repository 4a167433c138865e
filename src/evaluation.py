"""Honest scoring of model-inversion attacks: two independent evaluation classifiers and their metrics.

The attacked model judging its own inversions proves nothing (an adversarial pattern can fool it
at 100 % confidence). So classifiers trained apart from it decide what an inversion shows, as in the
GMI / KEDMI evaluations (Zhang et al. 2020; Chen et al. 2021):
  primary: a CNN of another architecture than the target (5x5 convs with batch norm, wider);
  second:  a network of another FAMILY, a multilayer perceptron on raw pixels (no convolution, no
           batch norm, dropout). One evaluator can share the target's blind spots: a pattern that
           fools convolutions into reading a class need not fool a model that sees pixels without any
           notion of locality, and the reverse. An inversion counts as correct only when BOTH read the
           target class.
Measured on the standard model over mnist-10k (test accuracy 99.50 % primary, 98.15 % second): the MLP is
the more lenient judge of the two, not the stricter: it reads MI-Face-as-published inversions (speckled
high-contrast patterns that fool the target) as their class 80 of 80 times where the primary reads 11, and
every class-mean image where the primary misreads one (the mean 5 as an 8). Requiring both makes the
headline at least as strict as the primary alone. A small vision transformer (another family; patch 4,
width 64, depth 4) cost 2.4-3x the primary per training step on the shared machine, so it was not adopted.
Both train centrally on the training split with the same small random shifts. How close an inversion
lies to the clients' private images of the attacked class is measured as KNN distance in the
primary's feature space and in pixels. Beside every attack belongs the no-attack baseline
(class_mean_images): what the server's public data gives without attacking at all.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from src.data import MNIST_SPEC, Dataset, to_tensor
from src.utils import UserError, autocast, derive_seed, load_cached, resolve_precision, save_torch, state_digest

# AdamW with a one-cycle schedule and random 2-pixel shifts.
HPARAMS = {'arch': 'evalnet-v1', 'batch_size': 128, 'lr': 3e-3, 'weight_decay': 5e-4, 'max_shift': 2}
# the same recipe for the MLP; it sees ~100x fewer FLOPs per image, so it affords more passes
HPARAMS_SECOND = {'arch': 'pixel-mlp-v1', 'batch_size': 128, 'lr': 3e-3, 'weight_decay': 5e-4, 'max_shift': 2}


class EvalClassifier(nn.Module):
    """conv5x5(32)-BN-ReLU x2 -> pool -> conv5x5(64)-BN-ReLU x2 -> pool -> FC (3136 for 28x28)->256-BN-ReLU ->
    dropout -> classes.

    Deliberately unlike the target CNN (3x3 convs, no padding, no batch norm, 128-d hidden layer).
    Takes raw pixels in [0, 1] like the target, normalising internally (spec: src.data.DatasetSpec).
    """

    def __init__(self, spec=MNIST_SPEC, dropout=0.3):
        super().__init__()
        c, h, w = spec.shape

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 5, padding=2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.spec = spec
        self.conv = nn.Sequential(*block(c, 32), *block(32, 32), nn.MaxPool2d(2),
                                  *block(32, 64), *block(64, 64), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Linear(64 * (h // 4) * (w // 4), 256, bias=False), nn.BatchNorm1d(256),
                                nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(256, spec.num_classes)

    def features(self, x):
        """Penultimate 256-d representation (used for KNN distances)."""
        return self.fc(self.conv(self.spec.normalise(x)).flatten(1))

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


class PixelMLP(nn.Module):
    """pixels (784) -> 512-ReLU -> dropout -> 256-ReLU -> dropout -> classes: the second evaluator's family.

    No convolution (no weight sharing, no locality prior) and no batch norm: it shares no inductive
    bias with the target CNN beyond being trained by gradient descent on the same kind of digits.
    Takes raw pixels in [0, 1], normalising internally.
    """

    def __init__(self, spec=MNIST_SPEC, dropout=0.3):
        super().__init__()
        self.spec = spec
        self.fc = nn.Sequential(nn.Linear(math.prod(spec.shape), 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(512, 256), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(256, spec.num_classes)

    def features(self, x):
        return self.fc(self.spec.normalise(x).flatten(1))

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


@dataclass(frozen=True)
class EvaluatorSpec:
    model: type          # its nn.Module class
    hparams: dict
    file_prefix: str     # cache file names start with this
    family: str          # in words, for the metrics
    epochs: object       # n_train -> default epochs


def _cnn_epochs(n_train):
    # about 40k training images seen: 5 epochs on 8k real digits reached 99.5 % test accuracy
    # (1 epoch already 99.0 %); 2 passes over a 60k set
    return max(2, min(8, math.ceil(40_000 / n_train)))


def _mlp_epochs(n_train):
    # about 160k images seen (20 passes over 8k, 3 over 60k): an MLP under random shifts keeps improving
    # for longer than the CNN, and its passes are cheap
    return max(3, min(20, math.ceil(160_000 / n_train)))


EVALUATORS = {
    'primary': EvaluatorSpec(EvalClassifier, HPARAMS, 'eval_classifier',
                             'convolutional network: 5x5 convs with batch norm, 256-d hidden layer', _cnn_epochs),
    'second': EvaluatorSpec(PixelMLP, HPARAMS_SECOND, 'eval_mlp',
                            'multilayer perceptron on pixels: no convolution, no batch norm, dropout', _mlp_epochs),
}


def default_epochs(n_train, kind='primary'):
    return EVALUATORS[kind].epochs(n_train)


def data_fingerprint(dataset):
    h = hashlib.sha256()
    for a in (dataset.train_images, dataset.train_labels):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def random_shift(x, max_shift, generator):
    """Translate each image by its own integer offset in [-max_shift, max_shift] (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]          # (n, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]          # (n, 1, W)
    return padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (n, C, H, W)


@torch.no_grad()
def predict(model, images, batch_size=1000):
    """Logits of `model` (eval mode, fp32) for images (N, C, H, W) in [0, 1]."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def features(model, images, batch_size=1000):
    """Penultimate features (N, 256) in fp32, computed in bf16 channels-last where the hardware runs bf16
    natively: 3.4x faster over the 60k private images on this CPU. An image's features barely depend
    on what else is in its batch (exactly not at all in bf16 here; tested: an exact copy of a private
    image stays within 1e-4 of it in feature space)."""
    model.eval()
    device = images.device
    with autocast(device, feature_precision(device)):
        return torch.cat([model.features(images[i:i + batch_size].contiguous(memory_format=torch.channels_last)).float()
                          for i in range(0, len(images), batch_size)])


def feature_precision(device):
    return resolve_precision('auto', torch.device(device))


def train_eval_classifier(dataset, seed, device, epochs, precision='auto', kind='primary'):
    spec = EVALUATORS[kind]
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    hp = spec.hparams
    # the primary keeps its original seed labels, so its existing caches stay valid
    tag = 'eval-classifier' if kind == 'primary' else f'eval-classifier-{kind}'
    torch.manual_seed(derive_seed(seed, tag, 'init'))
    model = spec.model(dataset.spec).to(device, memory_format=torch.channels_last)
    x = to_tensor(dataset.train_images, device)
    y = torch.from_numpy(dataset.train_labels.astype(np.int64)).to(device)
    n = len(y)
    steps_per_epoch = math.ceil(n / hp['batch_size'])
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp['lr'], weight_decay=hp['weight_decay'])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, hp['lr'], total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(derive_seed(seed, tag, 'data'))
    model.train()
    with tqdm(total=epochs * n, desc=f'training {kind} evaluation classifier ({dataset.name})', unit='img',
              leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, hp['batch_size']):
                idx = order[start:start + hp['batch_size']]
                if len(idx) < 2:  # batch norm needs two samples
                    continue
                xb = random_shift(x[idx], hp['max_shift'], generator).contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    loss = F.cross_entropy(model(xb), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(len(idx))
                if start % (100 * hp['batch_size']) == 0:  # reading the loss waits for the device: not every step
                    bar.set_postfix(loss=f'{loss.item():.3f}', refresh=False)
    return model.eval(), precision


def load_or_train_eval_classifier(dataset: Dataset, seed, cache_dir='cache', device='cpu', epochs=None,
                                  kind='primary'):
    """The `kind` evaluation classifier for `dataset` ('primary' or 'second'), from `cache_dir` if a valid copy
    is there, else trained and cached.

    Returns (model in eval mode on `device`, info dict with test_accuracy, arch, family, cache path, whether it
    was cached). The cache key covers the kind, the dataset name, a hash of its training data, the seed and the
    hyper-parameters, so a different split or setting never reuses a stale model. A cached file that fails to
    load, holds anything but tensors, has the wrong shapes, or whose weights do not match their stored digest
    is retrained (with a note), not trusted.
    """
    spec = EVALUATORS[kind]
    device = torch.device(device)
    epochs = epochs or spec.epochs(len(dataset.train_labels))
    fingerprint = data_fingerprint(dataset)
    hp = dict(spec.hparams, epochs=epochs)
    hp_key = hashlib.sha256(json.dumps(hp, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f'{spec.file_prefix}_{dataset.name}_{fingerprint[:12]}_seed{seed}_{hp_key}.pt')
    described = {'kind': kind, 'arch': hp['arch'], 'family': spec.family}

    loaded = _LOADED.get(_memo_key(path, device))
    if loaded is not None:  # every attack of a run scores with one model object, so the private
        return loaded[0], dict(loaded[1], from_cache=True)  # features it remembers are computed once

    def restore(saved):
        state, info = saved['state_dict'], saved['info']
        # checked before the digest, which would fail on a non-tensor with a less telling message
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError('not a state dict of tensors')
        if state_digest(state) != info['weights_sha256'] or info['data_sha256'] != fingerprint:
            raise UserError('weights do not match their recorded digest')
        model = spec.model(dataset.spec)
        model.load_state_dict(state)
        return _remember(path, device, model.to(device).eval(), dict(info, **described, cache_path=path,
                                                                     from_cache=True))

    cached = load_cached(path, f'{kind} evaluation-classifier', restore)
    if cached is not None:
        return cached

    t0 = time.perf_counter()
    trained, precision = train_eval_classifier(dataset, seed, device, epochs, kind=kind)
    train_seconds = time.perf_counter() - t0
    test_x = to_tensor(dataset.test_images, device)
    test_y = torch.from_numpy(dataset.test_labels.astype(np.int64)).to(device)
    test_accuracy = (predict(trained, test_x).argmax(1) == test_y).float().mean().item()
    state = {k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}
    info = {'dataset': dataset.name, 'data_sha256': fingerprint, 'seed': seed, 'hparams': hp,
            'num_train': int(len(dataset.train_labels)), 'num_test': int(len(dataset.test_labels)),
            'test_accuracy': test_accuracy, 'train_seconds': train_seconds, 'precision': precision,
            'weights_sha256': state_digest(state)}
    save_torch({'state_dict': state, 'info': info}, path)
    tqdm.write(f'{kind} evaluation classifier ({hp["arch"]}) for {dataset.name}: test accuracy '
               f'{test_accuracy:.4f} ({train_seconds:.0f} s); cached at {path}')
    model = spec.model(dataset.spec)
    model.load_state_dict(state)
    return _remember(path, device, model.to(device).eval(), dict(info, **described, cache_path=path,
                                                                 from_cache=False))


_LOADED = {}  # (cache file, device, its mtime and size) -> (model, info), for this process


def _memo_key(path, device):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, str(device), st.st_mtime_ns, st.st_size  # a file changed on disk is checked again


def _remember(path, device, model, info):
    model = model.to(memory_format=torch.channels_last)  # what features() feeds it
    info = dict(info, feature_precision=feature_precision(device))
    key = _memo_key(path, device)
    if key is not None:
        _LOADED[key] = (model, info)
    return model, info


@dataclass(frozen=True)
class Evaluators:
    """The two evaluation classifiers: `primary` (EvalClassifier; its features give the KNN distances) and
    `second` (PixelMLP, another family). info: {'primary': {...}, 'second': {...}} (test_accuracy, arch,
    family, cache_path, from_cache, ...)."""
    primary: nn.Module
    second: nn.Module
    info: dict


def load_evaluators(dataset, seed, cache_dir='cache', device='cpu', epochs=None):
    """Both evaluation classifiers for `dataset`, each from its cache or trained and cached (see
    load_or_train_eval_classifier); memoised per process, so every attack of a run scores with the same
    model objects. epochs: one number for both (tests), or None for each one's default."""
    primary, p_info = load_or_train_eval_classifier(dataset, seed, cache_dir, device, epochs, 'primary')
    second, s_info = load_or_train_eval_classifier(dataset, seed, cache_dir, device, epochs, 'second')
    return Evaluators(primary, second, {'primary': p_info, 'second': s_info})


def private_features(eval_model, px):
    """features() of the private images, remembered on the model by a hash of their pixels: every attack
    scored in a run compares with the same private set, and its features are most of the scoring time."""
    key = hashlib.sha256(px.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    cached = getattr(eval_model, '_private_features', None)
    if cached is None or cached[0] != key:
        cached = (key, features(eval_model, px))
        eval_model._private_features = cached  # dies with the model; weights are fixed in eval use
    return cached[1]


def _as_images(a, device):
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    if t.dtype == torch.uint8:
        t = t.float() / 255
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise UserError(f'images must be (N, C, H, W) or (N, H, W), got {tuple(t.shape)}')
    return t.float().to(device)


def _as_labels(a, device):
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).long().to(device)


def _nan_to_none(values):
    return [None if v != v else float(v) for v in values]


def _mean_or_none(values):
    """Mean of the finite entries of a list that may hold None (undefined), or None if none is defined."""
    a = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return None if a.size == 0 or np.isnan(a).all() else float(np.nanmean(a))


def summarise(per_image, mask, target_confidence=None):
    """Means over the images selected by `mask` (bool, one per image) of score_inversions' per-image scores.

    attack_accuracy: both evaluators read the target class (the headline); attack_accuracy_primary /
    _second: each on its own; eval_confidence: the primary's softmax probability for the target class;
    knn_*_distance: mean over the images whose class has private images. target_confidence (optional, one
    value per image, e.g. the attacked model's probability for the target): its mean over the mask.
    JSON-able floats; None where undefined (an empty mask, or no private image of the classes).
    """
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool).reshape(-1)
    n = len(per_image['target_class'])
    if len(m) != n:
        raise ValueError(f'summarise: mask has {len(m)} entries for {n} images')
    pick = lambda key: [v for v, keep in zip(per_image[key], m) if keep]  # noqa: E731
    cls = np.asarray(pick('target_class'), dtype=np.int64)
    count = int(m.sum())

    def accuracy(values):
        return float(np.mean(values)) if count else None

    out = {'count': count,
           'attack_accuracy': accuracy(np.asarray(pick('correct'), dtype=bool)),
           'attack_accuracy_primary': accuracy(np.asarray(pick('eval_prediction'), dtype=np.int64) == cls),
           'attack_accuracy_second': accuracy(np.asarray(pick('second_prediction'), dtype=np.int64) == cls),
           'eval_confidence': _mean_or_none(pick('eval_confidence')),
           'knn_feature_distance': _mean_or_none(pick('knn_feature_distance')),
           'knn_pixel_distance': _mean_or_none(pick('knn_pixel_distance'))}
    if target_confidence is not None:
        tc = target_confidence.detach().cpu() if isinstance(target_confidence, torch.Tensor) else target_confidence
        tc = np.asarray(tc, dtype=np.float64).reshape(-1)
        if len(tc) != n:
            raise ValueError(f'summarise: target_confidence has {len(tc)} entries for {n} images')
        out['target_confidence'] = _mean_or_none(list(tc[m]))
    return out


@torch.no_grad()
def score_inversions(evaluators, images, target_classes, private_x, private_y):
    """Score inversions with both evaluation classifiers.

    evaluators: an Evaluators (load_evaluators); images: (M, C, H, W) in [0, 1] (tensor or array);
    target_classes: (M,) the class each one attacks; private_x, private_y: the clients' training images and
    labels (what the attack tries to reveal).
    Returns {'per_image': lists, 'per_class': {str(c): summarise(...)}, 'overall': summarise(...)}; per image:
      eval_prediction / eval_confidence: the primary's prediction and its probability for the target class;
      second_prediction / second_confidence: the same for the second evaluator;
      correct: BOTH evaluators predict the target class;
      knn_feature_distance / knn_pixel_distance: L2 distance to the nearest private image OF THE TARGET
      CLASS, in the primary's 256-d feature space and in pixels (lower = closer to private data; None when
      no private image has the class); nearest_private_index: that image's index in private_x (by pixels),
      or -1.
    """
    primary, second = evaluators.primary, evaluators.second
    device = next(primary.parameters()).device
    x = _as_images(images, device)
    classes = _as_labels(target_classes, device)
    px = _as_images(private_x, device)
    py = _as_labels(private_y, device)
    if len(classes) != len(x) or len(py) != len(px):
        raise UserError('score_inversions: images/classes or private images/labels differ in length')

    probs = predict(primary, x).softmax(1)
    prediction = probs.argmax(1)
    confidence = probs.gather(1, classes[:, None]).squeeze(1)
    probs2 = predict(second, x.to(next(second.parameters()).device)).to(device).softmax(1)
    prediction2 = probs2.argmax(1)
    confidence2 = probs2.gather(1, classes[:, None]).squeeze(1)
    f_x, f_p = features(primary, x), private_features(primary, px)
    knn_feat = torch.full((len(x),), float('nan'), device=device)
    knn_pix = torch.full((len(x),), float('nan'), device=device)
    nearest = torch.full((len(x),), -1, dtype=torch.long, device=device)
    for c in classes.unique().tolist():  # at most 10 iterations; each is one batched distance matrix
        rows, pool = (classes == c).nonzero().squeeze(1), (py == c).nonzero().squeeze(1)
        if len(pool) == 0:
            continue
        # direct differences, not the |a|^2 - 2ab + |b|^2 shortcut, so an exact copy gives exactly 0
        d_feat = torch.cdist(f_x[rows], f_p[pool], compute_mode='donot_use_mm_for_euclid_dist')
        d_pix = torch.cdist(x[rows].flatten(1), px[pool].flatten(1), compute_mode='donot_use_mm_for_euclid_dist')
        knn_feat[rows] = d_feat.min(1).values
        knn_pix[rows], j = d_pix.min(1)
        nearest[rows] = pool[j]

    cpu = lambda t: t.cpu().numpy()  # noqa: E731
    per_image = {'target_class': cpu(classes).tolist(),
                 'eval_prediction': cpu(prediction).tolist(), 'eval_confidence': cpu(confidence).tolist(),
                 'second_prediction': cpu(prediction2).tolist(), 'second_confidence': cpu(confidence2).tolist(),
                 'correct': cpu((prediction == classes) & (prediction2 == classes)).tolist(),
                 'knn_feature_distance': _nan_to_none(cpu(knn_feat)),
                 'knn_pixel_distance': _nan_to_none(cpu(knn_pix)),
                 'nearest_private_index': cpu(nearest).tolist()}
    labels = np.asarray(per_image['target_class'], dtype=np.int64)
    return {'per_image': per_image,
            'per_class': {str(c): summarise(per_image, labels == c) for c in sorted(set(labels.tolist()))},
            'overall': summarise(per_image, np.ones(len(labels), dtype=bool))}


def class_mean_images(public_x, public_y, classes):
    """The NO-ATTACK baseline: per class in `classes`, the mean of the server's public images of that class,
    (len(classes), C, H, W) float on public_x's device. A class with no public image gets the mean of all
    the public images given (the best a server without that class could offer)."""
    x = _as_images(public_x, public_x.device if isinstance(public_x, torch.Tensor) else 'cpu')
    y = _as_labels(public_y, x.device)
    if len(x) != len(y) or len(x) == 0:
        raise UserError(f'class_mean_images: {len(x)} public images and {len(y)} labels (need the same, at least one)')
    overall = x.mean(0)
    return torch.stack([x[y == c].mean(0) if bool((y == c).any()) else overall for c in [int(c) for c in classes]])
