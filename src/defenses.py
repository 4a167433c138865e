"""Defenses a client or the aggregation protocol applies, each a config setting:

- DP-SGD (Abadi et al. 2016) on every client through Opacus: per-sample clipping to
  `dp_max_grad_norm`, Gaussian noise of std `dp_noise_multiplier * dp_max_grad_norm`, Poisson
  sampling, privacy spent accounted by Opacus's RDP accountant (record-level epsilon at `dp_delta`).
- Update clipping plus Gaussian noise (local DP on the whole update, user-level): the update is
  clipped to L2 norm `update_clip` and N(0, (update_noise * update_clip)^2) is added per coordinate.
- Update pruning (the defense the DLG paper tested): each tensor keeps its top `keep_fraction`
  entries by magnitude, the rest become zero.
- Secure aggregation: the server learns only the round's aggregate (see server.CuriousServer), so it
  never holds an individual update. Central DP added to that sum alone would not hide an
  individual update from a server that could see them; secure aggregation is what removes them.

Order on a client: local training (DP-SGD or plain) -> clip + noise -> prune. Pruning after the
noise is post-processing, so it keeps the DP guarantee.
"""
import math
import warnings

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset



def dp_on(cfg):
    return cfg.get('dp_noise_multiplier', 0) > 0 or cfg.get('dp_epsilon', 0) > 0


def client_recipe(cfg):
    """(local epochs, batch size, learning rate) a client trains with: the dp_* ones under DP-SGD."""
    if dp_on(cfg):
        return cfg['dp_local_epochs'], cfg['dp_batch_size'], cfg['dp_learning_rate']
    return cfg['local_epochs'], cfg['batch_size'], cfg['learning_rate']


def noise_for_epsilon(target_epsilon, delta, client_sizes, batch_size, local_epochs, rounds):
    """The smallest noise multiplier (to Opacus's search tolerance) at which every client's record-level
    epsilon after the whole run is at most `target_epsilon`. A client of n images takes ceil(n / batch_size)
    Poisson-sampled steps per epoch at sample rate 1 / ceil(n / batch_size), as Opacus's DPDataLoader does."""
    sigmas = []
    for n in sorted(set(int(s) for s in client_sizes)):
        steps_per_epoch = math.ceil(n / batch_size)
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Optimal order is the largest alpha')  # valid, if not tightest
            sigmas.append(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                               sample_rate=1 / steps_per_epoch,
                                               steps=steps_per_epoch * local_epochs * rounds, accountant='rdp'))
    return max(sigmas)


def with_dp_noise(cfg, client_sizes, log=lambda *a: None):
    """cfg with dp_noise_multiplier computed for its dp_epsilon (cfg itself without one)."""
    if cfg.get('dp_epsilon', 0) <= 0:
        return cfg
    sigma = noise_for_epsilon(cfg['dp_epsilon'], cfg['dp_delta'], client_sizes, cfg['dp_batch_size'],
                              cfg['dp_local_epochs'], cfg['num_rounds'])
    log(f"DP-SGD: noise multiplier {sigma:.3f} for epsilon {cfg['dp_epsilon']} at delta {cfg['dp_delta']} "
        f"({cfg['num_rounds']} rounds x {cfg['dp_local_epochs']} epochs, batch {cfg['dp_batch_size']})")
    return dict(cfg, dp_noise_multiplier=sigma)


def active(cfg):
    """Names of the defenses a config switches on."""
    names = []
    if dp_on(cfg):
        names.append('dp_sgd')
    if cfg.get('update_clip', 0) > 0:
        names.append('update_clip_noise')
    if cfg.get('keep_fraction', 1.0) < 1.0:
        names.append('pruning')
    if cfg.get('secure_aggregation', False):
        names.append('secure_aggregation')
    return names


def dp_client_update(model, images, labels, epochs, batch_size, lr, noise_multiplier, max_grad_norm,
                     accountant_history, generator, grad_sample_mode='ghost'):
    """DP-SGD local training with Opacus wrapping the plain SGD loop.

    `accountant_history` is this client's RDP history from earlier rounds (a list of
    (noise_multiplier, sample_rate, steps)); the new history is returned with the state,
    so the privacy spent keeps accumulating across rounds and survives a resume.
    """
    model.train()
    # Opacus draws the Poisson batches from torch's global RNG (its own generator only in secure_mode):
    # seed that from this client's generator, in a fork, so the update depends on the seeds alone
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        # expected, said once in the README rather than every client-round: a seeded (not
        # cryptographic) noise RNG, which reproducibility needs; and hooks on an input without gradient
        warnings.filterwarnings('ignore', message='Secure RNG turned off')
        warnings.filterwarnings('ignore', message='Full backward hook is firing')
        engine = PrivacyEngine(accountant='rdp')
        engine.accountant.history = [tuple(h) for h in accountant_history]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
        # ghost clipping: per-example gradient norms without materialising per-example gradients, then
        # a second backward pass of the clipped sum: the step of per-example hooks ('hooks'), faster
        # (benchmarks/bench_privacy.py measures both)
        criterion = torch.nn.CrossEntropyLoss()
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
            noise_generator=generator, grad_sample_mode=grad_sample_mode)
        if grad_sample_mode == 'ghost':  # its loss runs the two backward passes
            private_model, optimizer, criterion, loader = private
        else:
            private_model, optimizer, loader = private
        for _ in range(epochs):
            for x, y in loader:
                if len(y) == 0:  # Poisson sampling can draw an empty batch: a step with no data
                    continue
                loss = criterion(private_model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    state = {k.removeprefix('_module.'): v.detach().clone() for k, v in private_model.state_dict().items()}
    private_model._close()  # remove Opacus's hooks from `model`
    return state, len(labels), [list(h) for h in engine.accountant.history]


def epsilon(accountant_history, delta):
    if not accountant_history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in accountant_history]
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Optimal order is the largest alpha')  # a valid, if loose, bound
        return accountant.get_epsilon(delta)


def clip_and_noise(delta, clip, noise_multiplier, generator):
    """Clip the whole update to L2 norm `clip`, then add Gaussian noise of std noise_multiplier*clip."""
    norm = torch.sqrt(sum((v.float() ** 2).sum() for v in delta.values()))
    scale = min(1.0, clip / (norm.item() + 1e-12))
    out = {}
    for k, v in delta.items():
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.device)
        out[k] = v * scale + noise_multiplier * clip * noise
    return out


def prune(delta, keep_fraction):
    """Keep the round(keep_fraction * numel) largest-magnitude entries of every tensor."""
    out = {}
    for k, v in delta.items():
        keep = max(1, round(keep_fraction * v.numel()))
        flat = v.reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.abs().topk(keep).indices] = True
        out[k] = torch.where(mask, flat, torch.zeros_like(flat)).reshape(v.shape)
    return out


def defend_update(delta, cfg, generator):
    """What the client sends instead of its raw update, under the config's update defenses."""
    if cfg.get('update_clip', 0) > 0:
        delta = clip_and_noise(delta, cfg['update_clip'], cfg.get('update_noise', 0.0), generator)
    if cfg.get('keep_fraction', 1.0) < 1.0:
        delta = prune(delta, cfg['keep_fraction'])
    return delta


def update_epsilon(rounds, noise_multiplier, delta):
    """User-level epsilon of `rounds` releases of a clipped update with Gaussian noise (RDP)."""
    if noise_multiplier <= 0:
        return float('inf')
    return epsilon([(noise_multiplier, 1.0, rounds)], delta)


def defend_gradients(grads, cfg, generator, examples=None):
    """What a client under `cfg`'s defenses sends for intercepted batch gradients.

    grads: {name: (n, *shape)}, one gradient per intercepted batch (one local SGD step: the mean
    over its B examples). DP-SGD (Abadi et al. 2016) clips EACH example's gradient to C, sums them,
    adds N(0, (sigma*C)^2) and divides by B, so it needs `examples`: {name: (n, B, *shape)}, each
    example's gradient in those batches (for B = 1 the batch gradient itself). The update defenses
    act on the step the client sends, -lr * g, and the server, knowing lr, reads the gradient back.
    Secure aggregation is not applied here: the mean of K clients' gradients is the gradient of one
    K-times larger batch, so the attack handles it as a larger batch.
    """
    names = list(grads)
    n = next(iter(grads.values())).shape[0]
    dp = cfg.get('dp_noise_multiplier', 0) > 0
    if dp and examples is None:
        raise ValueError('DP-SGD clips every example\'s gradient: pass examples={name: (n, B, *shape)}')
    rows = []
    for i in range(n):
        g = {k: grads[k][i] for k in names}
        if dp:
            clip, sigma = cfg['dp_max_grad_norm'], cfg['dp_noise_multiplier']
            batch = examples[names[0]].shape[1]
            summed = {k: 0.0 for k in names}
            for b in range(batch):
                one = {k: examples[k][i, b] for k in names}
                norm = torch.sqrt(sum((v.float() ** 2).sum() for v in one.values()))
                scale = min(1.0, clip / (norm.item() + 1e-12))
                summed = {k: summed[k] + one[k] * scale for k in names}
            # the noise is added once to the sum, not to each example: its std on the mean is sigma*C/B
            g = {k: (summed[k] + sigma * clip * torch.randn(summed[k].shape, generator=generator,
                                                            dtype=torch.float32).to(summed[k].device)) / batch
                 for k in names}
        lr = cfg['dp_learning_rate'] if dp else cfg['learning_rate']  # the client's step size (client_recipe)
        step = {k: -lr * v for k, v in g.items()}
        step = defend_update(step, cfg, generator)
        rows.append({k: -v / lr for k, v in step.items()})
    return {k: torch.stack([r[k] for r in rows]) for k in names}
