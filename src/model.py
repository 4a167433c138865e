"""The target models, built for a dataset's spec (src.data.DatasetSpec: image shape, classes, normalisation).

    cnn    the original README's CNN (default): conv 3x3 (32) -> ReLU -> max-pool 2 -> conv 3x3 (64) -> ReLU
           -> max-pool 2 -> FC 128 -> ReLU -> dropout 0.5 -> FC. A 28x28 input becomes 26 -> 13 -> 11 -> 5, so
           fc1 sees 64*5*5 = 1600 features (the original README's "1024" does not follow).
    mlp    McMahan et al. 2017's "2NN" on pixels: FC 200 -> ReLU -> FC 200 -> ReLU -> dropout -> FC.
    lenet  LeNet-5 (LeCun et al. 1998) as commonly run today: conv 5x5 (6, padded) -> ReLU -> max-pool 2 ->
           conv 5x5 (16) -> ReLU -> max-pool 2 -> FC 120 -> ReLU -> FC 84 -> ReLU -> dropout -> FC.

Every model takes raw pixels in [0, 1] (what attacks reconstruct) and normalises inside with the spec's
mean/std, which SGD trains markedly better on. Each has one `dropout` (src.model.Dropout) before its last
layer, so clients seed its masks the same way whatever the architecture.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.data import MNIST_SPEC


class Dropout(nn.Dropout):
    """nn.Dropout that draws its mask from `self.generator` when one is set.

    Clients trained at the same time in threads must not share torch's global RNG, or the
    masks (and so the result) would depend on thread timing; with a generator per client
    the masks are reproducible whatever runs beside them.
    """
    generator = None

    def forward(self, x):
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        keep = torch.empty(x.shape, device=x.device).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep.to(x.dtype) / (1 - self.p)


class CNN(nn.Module):
    def __init__(self, spec=MNIST_SPEC, dropout=0.5):
        super().__init__()
        c, h, w = spec.shape
        if min(h, w) < 10:
            raise ValueError(f'the cnn needs images of at least 10x10 pixels, not {h}x{w}')
        self.spec = spec
        self.conv1 = nn.Conv2d(c, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * (((h - 2) // 2 - 2) // 2) * (((w - 2) // 2 - 2) // 2), 128)
        self.dropout = Dropout(dropout)
        self.fc2 = nn.Linear(128, spec.num_classes)

    def features(self, x):
        """The conv features that enter fc1 (N, 64*5*5 for 28x28), from raw pixels in [0, 1]."""
        x = F.max_pool2d(F.relu(self.conv1(self.spec.normalise(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(self.features(x)))))


class MLP(nn.Module):
    def __init__(self, spec=MNIST_SPEC, dropout=0.5, hidden=200):
        super().__init__()
        self.spec = spec
        self.fc1 = nn.Linear(spec.shape[0] * spec.shape[1] * spec.shape[2], hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.dropout = Dropout(dropout)
        self.fc3 = nn.Linear(hidden, spec.num_classes)

    def forward(self, x):
        h = F.relu(self.fc2(F.relu(self.fc1(self.spec.normalise(x).flatten(1)))))
        return self.fc3(self.dropout(h))


class LeNet(nn.Module):
    def __init__(self, spec=MNIST_SPEC, dropout=0.5):
        super().__init__()
        c, h, w = spec.shape
        if min(h, w) < 12:
            raise ValueError(f'lenet needs images of at least 12x12 pixels, not {h}x{w}')
        self.spec = spec
        self.conv1 = nn.Conv2d(c, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2), 120)
        self.fc2 = nn.Linear(120, 84)
        self.dropout = Dropout(dropout)
        self.fc3 = nn.Linear(84, spec.num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(self.spec.normalise(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(self.dropout(F.relu(self.fc2(F.relu(self.fc1(x))))))


MODELS = {'cnn': CNN, 'mlp': MLP, 'lenet': LeNet}


def create_model(name, spec, **kwargs):
    """The registry's model `name` for images and classes as `spec` says (kwargs: e.g. dropout)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](spec, **kwargs)


def dropouts(model):
    """The model's Dropout layers (src.model.Dropout), whose masks a client seeds."""
    return [m for m in model.modules() if isinstance(m, Dropout)]


def seed_dropout(model, generator, p=None):
    """Every Dropout of `model` draws from `generator` (and uses rate p when given)."""
    for m in dropouts(model):
        m.generator = generator
        if p is not None:
            m.p = p


def param_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
