"""The target CNN of the original README.

conv 1->32 (3x3) -> ReLU -> max-pool 2 -> conv 32->64 (3x3) -> ReLU -> max-pool 2
-> FC 1600->128 -> ReLU -> dropout 0.5 -> FC 128->10.
With 3x3 kernels and no padding a 28x28 input becomes 26 -> 13 -> 11 -> 5, so the first
FC layer sees 64*5*5 = 1600 features (the original README's "1024" does not follow).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# MNIST's pixel mean and std. Normalising inside the model keeps its input space raw pixels in
# [0, 1] (what attacks reconstruct) while SGD sees centred inputs, which trains markedly better.
MEAN, STD = 0.1307, 0.3081


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
    def __init__(self, num_classes=10, dropout=0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * 5 * 5, 128)
        self.dropout = Dropout(dropout)
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x):
        """The conv features that enter fc1 (N, 1600), from raw pixels in [0, 1]."""
        x = F.max_pool2d(F.relu(self.conv1((x - MEAN) / STD)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(self.features(x)))))


def param_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
