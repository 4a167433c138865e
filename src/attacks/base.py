"""The attack interface, and what an attack may see.

An attack is a subclass of `Attack` (as a federated strategy is a subclass of Flower's `Strategy`):
a name, the flags it adds, the figures and headline numbers it declares, and three steps that
`src.attacks.runner` calls in order:

    observe(private, view, settings) -> Observation | None   the CLIENTS' side (optional): what they send
    run(view, settings) -> result                             the attacker: sees an AttackerView only
    score(result, private, truth, view, settings, out_dir)    scoring: metrics, arrays, figures

Honesty by construction: `AttackerView` holds what the threat model grants the server (the global
model, the training protocol it announced, its own record of client updates, its public data) and has
no field for the clients' data. `PrivateData` reaches `observe` (a simulation of what clients compute
and send; its result enters the view as `observed`, the images it used go to `score` as `truth`) and
`score`, never `run`.

Adding an attack: one file under src/attacks/ with a subclass, and one line in runner.ATTACKS.
"""
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from src.data import MNIST_SPEC


@dataclass(frozen=True)
class AttackerView:
    """What the honest-but-curious server holds. There is no field for any client's data."""
    model: torch.nn.Module     # the final global model: fp32, eval mode, on `device`
    training: dict             # what the protocol announced: config (no partition), per-round accuracy, defenses
    captured: dict             # the server's own record of client updates (captured_updates.pt), or None
    public_x: torch.Tensor     # the server's public data: the dataset's test split, (N, C, H, W) in [0, 1]
    public_y: torch.Tensor     # (N,) int64
    dataset: str               # the dataset's name ('mnist', 'fashion-mnist', 'cifar10', 'idx')
    device: torch.device
    spec: Any = MNIST_SPEC     # the images' shape, classes and normalisation (src.data.DatasetSpec)
    cache_dir: str = 'cache'   # where trained helpers (GAN prior) are kept
    observed: Any = None       # what clients sent for this attack (from Attack.observe), if it asks

    @property
    def config(self):
        return self.training['config']


@dataclass(frozen=True)
class PrivateData:
    """The clients' training data: for the clients' side (observe) and for scoring, never for run."""
    train_x: torch.Tensor      # every training image of the dataset, (N, C, H, W) in [0, 1], on device
    train_y: torch.Tensor      # (N,) int64
    client_indices: list       # one int64 array of indices into train_x per client
    dataset: Any               # src.data.Dataset (uint8 arrays): the evaluation classifiers train on its train split

    def client(self, c):
        idx = torch.as_tensor(self.client_indices[c], device=self.train_x.device)
        return self.train_x[idx], self.train_y[idx]

    def clients(self):
        """All clients' images and labels, concatenated in client order."""
        idx = torch.as_tensor(np.concatenate(self.client_indices), device=self.train_x.device)
        return self.train_x[idx], self.train_y[idx]


@dataclass
class Observation:
    sent: Any                  # what the server receives: enters AttackerView.observed
    truth: Any = None          # what the clients used (images, labels, indices): for score only
    public_withheld: Any = None  # indices into the public split the server loses for this attack (e.g. a
    #                              membership game's non-members): run() sees public_x/public_y without them


@dataclass
class Report:
    metrics: dict              # JSON-able; goes to metrics.json under Attack.key
    arrays: dict = field(default_factory=dict)  # numpy arrays; go to reconstructions.npz as 'key/name'


class Attack:
    name = ''          # its --attacks name
    key = ''           # its key in metrics.json
    title = ''         # its heading in report.html
    figures = ()       # files it writes into the output folder, in report order
    # (dotted path in its metrics, label, kind): the numbers report.html, the defense sweep and the
    # metrics schema show; kind is 'fraction' (in [0, 1]), 'db', 'seconds' or 'number'
    headline = ()
    captions = {}      # figure -> dotted path of the sentence in its metrics that report.html shows under it

    @staticmethod
    def metric(metrics, path):
        """The value at a dotted path in an attack's metrics, None if absent."""
        for part in path.split('.'):
            metrics = metrics.get(part) if isinstance(metrics, dict) else None
        return metrics

    def headline_values(self, metrics):
        """[(label, kind, value)] of the declared headline numbers in this attack's metrics (None if absent)."""
        return [(label, kind, self.metric(metrics, path)) for path, label, kind in self.headline]

    def add_arguments(self, parser):
        """Its flags, under its own heading."""

    def check(self, settings):
        """Raise UserError for impossible flag values, before any work starts."""

    def check_data(self, settings, view):
        """Raise UserError for flag values impossible for this data (e.g. its number of classes): called for
        every chosen attack once the data is loaded, before any attack runs."""

    def observe(self, private, view, settings):
        """The clients' side, for attacks on what a client sends (e.g. one gradient): an Observation, or None."""
        return None

    def run(self, view, settings):
        """The attack itself, from the server's view alone. Returns whatever score() takes."""
        raise NotImplementedError

    def score(self, result, private, truth, view, settings, out_dir):
        """Measure what leaked against the private data; write the figures; return a Report.

        metrics must hold 'summary' (one line), 'threat_model' (dict) and 'seed'."""
        raise NotImplementedError
