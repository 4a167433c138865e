"""All K clients of a round as one computation: the trainer for GPUs.

The sequential trainer (src.federated.local_update -> src.client.client_update) trains one
client after another; on a GPU each of its steps is a batch of 64 through a small CNN, a few
microseconds of arithmetic per kernel, so the GPU mostly waits for kernel launches. Here the K
clients' weights are stacked ({name: (K, *shape)}) and one step trains all of them: grouped
convolutions (groups=K) over inputs whose channels hold one client each, batched matmuls for
the FC layers, and plain SGD on the stacked tensors. On CUDA that step is captured once in a
CUDA graph and replayed.

Each client keeps exactly its sequential semantics: the same torch.randperm per epoch from its
(seed, 'shuffle', round, client) generator, the same dropout masks drawn from its (seed,
'dropout', round, client) generator exactly as src.model.Dropout draws them, the same loss (mean
cross-entropy over the real samples of its batch) and its own number of steps. Step t of the
round is every client's t-th step; rows a client does not fill (its ragged last batch, or all
of them once its steps are done) have loss weight 0, and a client without a batch takes no step.
The update defenses (clip/noise/prune) are then applied per client as local_update applies them.

DP-SGD (Opacus) stays sequential: its per-sample gradient hooks need one nn.Module per client,
so runs with dp_noise_multiplier > 0 always use the sequential trainer (uses_batched_trainer).
"""
import contextlib

import torch
import torch.nn.functional as F

from src.defenses import defend_update
from src.data import MNIST_SPEC
from src.utils import autocast, capture_cuda_graph, derive_seed

TRAINERS = ('auto', 'sequential', 'batched')
PARAMS = ('conv1.weight', 'conv1.bias', 'conv2.weight', 'conv2.bias', 'fc1.weight', 'fc1.bias',
          'fc2.weight', 'fc2.bias')  # src.model.CNN's parameters, which batched_logits computes with
# On an H200 (benchmarks/bench_batched.py, 2026-11-26) channels_last was about even with the default
# layout (430k vs 443k samples/s at K = 5, 542k vs 532k at K = 10, 564k vs 557k at K = 20); on CPU it is
# what made conv2 match the sequential trainer bit for bit on the Intel host this was written on, so it stays on.
CHANNELS_LAST = True
CUDA_GRAPH = True  # capture the step on CUDA (benchmarks/bench_batched.py turns it off to time the eager step)
# On CPU, oneDNN runs a grouped convolution with one input channel per group (conv1) in another
# summation order than the sequential trainer's single-client conv1: up to 6e-7 apart in the
# forward pass, 1e-6 in the weights after a round. Running conv1 once per client on its channel
# slice (autograd then takes each client's weight gradient from that same kernel) made the batched
# trainer equal the sequential one bit for bit in CPU fp32 on the Intel host this was written on, for
# batches of at least 16 rows (the matmuls' kernels change below that). Which kernels sum in which
# order depends on the CPU: on an AMD EPYC (Zen 4) host grouped conv2, the batched matmuls' and the
# loss's reductions, and the thread count (1 per client in the sequential trainer) differ too, and the
# two trainers agree to 6e-7 after 2 rounds (tests/test_batched_training.py holds them to 1e-6).
# It costs K small convolutions instead of one, so only CPU fp32 does it: on CUDA, cuDNN's choice of
# algorithms and TF32 rule bit equality out anyway. Tests turn it off to check the grouped arithmetic.
PER_CLIENT_CONV1_ON_CPU = True


def uses_batched_trainer(cfg, device):
    """cfg['trainer']: 'batched', or 'auto' on CUDA (on 2 CPU cores batching measured 0.7-1.0x of the
    threaded sequential trainer, so 'auto' keeps that one there). DP-SGD runs are always sequential."""
    if cfg['dp_noise_multiplier'] > 0 or cfg.get('model', 'cnn') != 'cnn':
        return False
    return cfg['trainer'] == 'batched' or (cfg['trainer'] == 'auto' and device.type == 'cuda')


def batched_logits(weights, x, keep, dropout, channels_last, per_client_conv1=False):
    """Logits (K, B, classes) of K CNNs: x is (B, K*C, H, W), normalised, row i holding every client's i-th
    sample, client c in channels [c*C, (c+1)*C); keep (K, B, hidden) are the dropout masks.
    The same arithmetic as src.model.CNN.forward, one client per channel group."""
    k, b = keep.shape[:2]
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def conv(h, name):
        w = weights[name + '.weight'].flatten(0, 1).contiguous(memory_format=layout)
        bias = weights[name + '.bias'].flatten()
        if per_client_conv1 and name == 'conv1':
            per_client = zip(h.chunk(k, 1), w.chunk(k), bias.chunk(k))
            h = torch.cat([F.conv2d(h_c, w_c, b_c) for h_c, w_c, b_c in per_client], 1)
        else:
            h = F.conv2d(h, w, bias, groups=k)
        return F.max_pool2d(F.relu(h), 2)

    h = conv(conv(x, 'conv1'), 'conv2')  # (B, K*64, 5, 5) for 28x28
    h = h.reshape(b, k, -1).transpose(0, 1)  # (K, B, 1600 for 28x28), each client's features in CNN.features' order
    h = F.relu(torch.baddbmm(weights['fc1.bias'].unsqueeze(1), h, weights['fc1.weight'].transpose(1, 2)))
    if dropout > 0:  # as src.model.Dropout: x * mask / (1 - p)
        h = h * keep.to(h.dtype) / (1 - dropout)
    return torch.baddbmm(weights['fc2.bias'].unsqueeze(1), h, weights['fc2.weight'].transpose(1, 2))


class StackedClients:
    """K clients' stacked weights, all their data, and one SGD step that trains every client.

    A step reads its inputs from fixed buffers, which the caller fills: index (B, K) into the
    concatenated data, weight (K, B) the loss weight of each row (1/rows, or 0 for a row the
    client does not fill), keep (K, B, hidden) the dropout masks. Fixed buffers are what a CUDA
    graph needs (its replay reads the same addresses); with graph=True the step is captured once.
    A client whose rows all weigh 0 gets a gradient of exactly 0, so plain SGD (no momentum, no
    weight decay) leaves its weights exactly as they are: it takes no step.
    """

    def __init__(self, client_data, global_state, batch_size, lr, dropout, precision, channels_last, graph,
                 spec=MNIST_SPEC):
        if tuple(global_state) != PARAMS:
            raise ValueError(f'the batched trainer computes src.model.CNN ({", ".join(PARAMS)}), '
                             f'not a model with {", ".join(global_state)}')
        self.sources = [t for pair in client_data for t in pair]  # what the cache compares (and keeps alive)
        self.key = (batch_size, lr, dropout, precision, channels_last, graph, spec)
        device = client_data[0][0].device
        k = len(client_data)
        self.data_x = torch.cat([x for x, _ in client_data])  # (N, C, H, W), client after client
        self.data_y = torch.cat([y for _, y in client_data])
        self.weights = {name: v.detach().float().unsqueeze(0).repeat(k, *[1] * v.dim()).requires_grad_()
                        for name, v in global_state.items()}
        self.lr, self.dropout, self.precision, self.channels_last = lr, dropout, precision, channels_last
        self.spec = spec
        self.per_client_conv1 = PER_CLIENT_CONV1_ON_CPU and device.type == 'cpu' and precision == 'fp32'
        self.index = torch.zeros(batch_size, k, dtype=torch.long, device=device)
        self.weight = torch.zeros(k, batch_size, device=device)  # all 0 while warming up: no weight moves
        self.keep = torch.zeros(k, batch_size, global_state['fc1.weight'].shape[0], device=device)
        self.graph = capture_cuda_graph(self._step) if graph else None

    def matches(self, client_data, key):
        flat = [t for pair in client_data for t in pair]
        return key == self.key and len(flat) == len(self.sources) and all(a is b for a, b in zip(flat, self.sources))

    def load(self, states):
        """Client c starts from states[c]."""
        with torch.no_grad():
            for name, w in self.weights.items():
                w.copy_(torch.stack([s[name] for s in states]))

    def state(self, c, like):
        """Client c's weights as a state dict laid out like `like` (the global state)."""
        return {name: torch.empty_like(like[name]).copy_(w[c].detach()) for name, w in self.weights.items()}

    def step(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def _step(self):
        x = self.data_x[self.index]  # (B, K, C, H, W), normalised per channel as the CNN does inside
        x = self.spec.normalise(x.flatten(0, 1)).view(x.shape).flatten(1, 2)  # (B, K*C, H, W)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.data_y[self.index.t()]  # (K, B)
        with autocast(x.device, self.precision, cache_enabled=False):  # the cache and CUDA graphs do not mix
            logits = batched_logits(self.weights, x, self.keep, self.dropout, self.channels_last,
                                    self.per_client_conv1)
            # each client's mean cross-entropy over its real rows, as F.cross_entropy(reduction='mean') on them
            per_row = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction='none')
            loss = (per_row * self.weight.flatten()).sum()
        params = list(self.weights.values())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():  # plain SGD, as torch.optim.SGD does it: w += -lr * grad
            torch._foreach_add_(params, list(grads), alpha=-self.lr)


_captured = [None]  # the latest StackedClients with a CUDA graph, reused while data and settings stay


def stacked_clients(client_data, global_state, batch_size, lr, dropout, precision, spec=MNIST_SPEC):
    device = client_data[0][0].device
    graph = device.type == 'cuda' and CUDA_GRAPH
    key = (batch_size, lr, dropout, precision, CHANNELS_LAST, graph, spec)
    if graph and _captured[0] is not None and _captured[0].matches(client_data, key):
        return _captured[0]
    _captured[0] = None  # free the old graph's memory before capturing a new one
    clients = StackedClients(client_data, global_state, batch_size, lr, dropout, precision, CHANNELS_LAST, graph,
                             spec)
    if graph:
        _captured[0] = clients
    return clients


def round_plan(sizes, epochs, batch_size, shuffles):
    """Which samples every client trains on at every step of the round, in the sequential order.

    Client c takes epochs * ceil(n_c / B) steps: each epoch a fresh torch.randperm(n_c) from its
    shuffle generator, cut into batches of B (the last one ragged). Rows a client does not fill
    point at its first sample with weight 0. Returns, on the CPU: index (T, B, K) into the clients'
    concatenated data, weight (T, K, B) = 1/rows on real rows else 0, rows (T, K).
    """
    k = len(sizes)
    offsets = [sum(sizes[:c]) for c in range(k)]
    batches = [-(-n // batch_size) for n in sizes]
    steps = epochs * max(batches)
    index = torch.tensor(offsets).repeat(steps, batch_size, 1)
    rows = torch.zeros(steps, k, dtype=torch.long)
    for c, (n, nb, shuffle) in enumerate(zip(sizes, batches, shuffles)):
        for e in range(epochs):
            order = torch.randperm(n, generator=shuffle) + offsets[c]
            padded = torch.cat([order, order.new_full((nb * batch_size - n,), offsets[c])])
            index[e * nb:(e + 1) * nb, :, c] = padded.view(nb, batch_size)
            rows[e * nb:(e + 1) * nb, c] = batch_size
            rows[(e + 1) * nb - 1, c] = n - (nb - 1) * batch_size
    real = torch.arange(batch_size) < rows.unsqueeze(-1)  # (T, K, B)
    weight = real.float() / rows.clamp(min=1).unsqueeze(-1)  # 1/rows, rounded as F.cross_entropy's mean
    return index, weight, rows


def batched_round(cfg, global_state, client_data, r, precision, dp_history, dropout, progress=None,
                  spec=MNIST_SPEC):
    """Round r for every client at once; returns what src.federated.train_round returns,
    [(state the client sends, num_samples, its DP history)], in client order."""
    seed, device, clients = cfg['seed'], client_data[0][0].device, range(len(client_data))
    shuffles = [torch.Generator().manual_seed(derive_seed(seed, 'shuffle', r, c)) for c in clients]
    masks = [torch.Generator(device).manual_seed(derive_seed(seed, 'dropout', r, c)) for c in clients]
    states = train_stacked(client_data, [global_state] * len(clients), cfg['local_epochs'], cfg['batch_size'],
                           cfg['learning_rate'], dropout, precision, shuffles, masks, progress, spec)
    results = []
    for c, (state, (_, y)) in enumerate(zip(states, client_data)):
        if cfg['update_clip'] > 0 or cfg['keep_fraction'] < 1:  # as src.federated.local_update defends
            noise = torch.Generator().manual_seed(derive_seed(seed, 'update_noise', r, c))
            sent = defend_update({k: state[k] - global_state[k] for k in state}, cfg, noise)
            state = {k: global_state[k] + sent[k] for k in state}
        results.append((state, len(y), dp_history[c]))
    return results


def train_stacked(client_data, start_states, epochs, batch_size, lr, dropout, precision, shuffles, masks,
                  progress=None, spec=MNIST_SPEC):
    """Each client c trains from start_states[c] on client_data[c] = (x, y), exactly as src.client.client_update
    does with shuffle generator shuffles[c] and its Dropout drawing from masks[c]; all clients as one
    computation. Returns their final states (laid out like start_states[0]), in client order."""
    device = client_data[0][0].device
    sizes = [len(y) for _, y in client_data]
    index, weight, rows = round_plan(sizes, epochs, batch_size, shuffles)
    index, weight = index.to(device), weight.to(device)
    # a CUDA graph is captured and replayed on the current device's streams: make that the data's device
    with torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext():
        clients = stacked_clients(client_data, start_states[0], batch_size, lr, dropout, precision, spec)
        clients.load(start_states)
        hidden = clients.keep.shape[-1]
        for t, step_rows in enumerate(rows.tolist()):
            clients.index.copy_(index[t])
            clients.weight.copy_(weight[t])
            for c, n in enumerate(step_rows):
                if n and dropout > 0:  # drawn as src.model.Dropout draws: one (rows, hidden) mask per batch
                    mask = torch.empty((n, hidden), device=device).bernoulli_(1 - dropout, generator=masks[c])
                    clients.keep[c, :n].copy_(mask)
            clients.step()
            if progress is not None:
                progress.update(sum(step_rows))
    return [clients.state(c, start_states[0]) for c in range(len(sizes))]
