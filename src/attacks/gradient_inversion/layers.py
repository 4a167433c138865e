"""What the gradient attack needs of a model, for any nn.Module: its parameters in order, its output layer's
bias (labels), its first fully connected layer (the closed form), each example's gradient and a forward pass
with one set of weights per client (torch.func: functional_call, vmap, grad).

Measured on the CNN (CPU, 2 threads): hand-written per-example gradients (unfolded convolutions) were 1.04x
as fast as torch.func's and a grouped-convolution forward for all clients 1.11x, so every model, the CNN
included, takes these; only the feature search keeps a CNN-specific path (search.py, 1.7x).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from src.model import CNN


def is_cnn(model):
    """The target CNN itself (not a subclass such as a malicious server's crafted model)."""
    return type(model) is CNN


def param_names(model):
    return [name for name, _ in model.named_parameters()]


def _linears(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]


def output_bias(model):
    """The name of the last fully connected layer's bias: its gradient is mean(p - onehot(y)) (labels)."""
    linears = _linears(model)
    if not linears:
        raise ValueError(f'{type(model).__name__} has no fully connected layer with a bias to read labels from')
    return linears[-1][0] + '.bias'


def first_fc(model):
    """(name, module) of the first fully connected layer with a bias, in the order the modules are
    registered (the forward order of every model in src.model): the closed form reads its input."""
    linears = _linears(model)
    if not linears:
        raise ValueError(f'{type(model).__name__} has no fully connected layer with a bias')
    return linears[0]


def before(model, layer_name):
    """Names of the parameters registered before `layer_name`'s: those its input depends on."""
    names = param_names(model)
    return names[:names.index(layer_name + '.weight')]


def flat(grads):
    """{name: (N, *shape)} -> (N, total size), in the dict's order (the model's parameter order)."""
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


def per_example_grads(model, x, targets, create_graph=False):
    """Gradient of each example's cross-entropy (soft targets (N, classes)) w.r.t. every parameter,
    {name: (N, *shape)}, eval mode. Differentiable in x when x requires grad (create_graph)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    if len(x) == 1:  # one example (DLG, iDLG): plain autograd, 1.4x faster than vmap here (measured on LeNet)
        params = {name: p.requires_grad_(True) for name, p in params.items()}
        logits = functional_call(model, (params, buffers), (x,))
        loss = -(targets * F.log_softmax(logits, 1)).sum()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        return {name: g[None] for name, g in zip(params, grads)}

    def loss(p, xi, ti):
        logits = functional_call(model, (p, buffers), (xi[None],))
        return -(ti[None] * F.log_softmax(logits, 1)).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, targets)
    return grads if create_graph else {k: v.detach() for k, v in grads.items()}


def batch_grads(model, x, targets, batch_size, create_graph=False):
    """Gradients of the mean loss over each consecutive group of batch_size examples, (n_batches, *shape)."""
    g = per_example_grads(model, x, targets, create_graph)
    return {k: v.view(-1, batch_size, *v.shape[1:]).mean(1) for k, v in g.items()}


class _Reached(Exception):
    pass


def fc_input(model, layer, x, params=None):
    """The input of `layer` (a submodule) when `model` runs on x, without running the layers after it;
    with params ({name: tensor}), under those weights (torch.func.functional_call)."""
    seen = []

    def stop(module, args):
        seen.append(args[0])
        raise _Reached

    handle = layer.register_forward_pre_hook(stop)
    try:
        if params is None:
            model(x)
        else:
            functional_call(model, params, (x,))
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0].flatten(1)


def fc_input_is_nonnegative(model):
    """Whether the first FC layer's input cannot be negative (it follows a ReLU), probed on random images."""
    probe = torch.randn(8, *model.spec.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return bool((fc_input(model, first_fc(model)[1], probe.to(next(model.parameters()).device)) >= 0).all())


def pixels_from_fc_input(model, a2):
    """Images whose FC input is a2 when the first FC layer reads the normalised pixels themselves (an MLP):
    a2 (N, C*H*W) -> (N, C, H, W), exact. None when it reads anything else (checked on a random probe)."""
    name, fc = first_fc(model)
    spec = model.spec
    if before(model, name) or fc.in_features != math.prod(spec.shape):
        return None
    probe = torch.rand(2, *spec.shape, generator=torch.Generator().manual_seed(0)).to(a2.device)
    with torch.no_grad():
        if not torch.allclose(fc_input(model, fc, probe), spec.normalise(probe).flatten(1), atol=1e-6):
            return None
    return spec.denormalise(a2.view(-1, *spec.shape)).clamp(0, 1)


def fc_input_and_grads(model, x, G):
    """The first FC layer's input a (N, in), and each example's gradient of (a . G) w.r.t. the parameters
    before that layer, {name: (N, *shape)}: the conv weight gradients a client's image leaves when
    dL/da = G. Differentiable in x (the feature search matches both)."""
    name, layer = first_fc(model)
    names = set(before(model, name))
    earlier = {n: p.detach() for n, p in model.named_parameters() if n in names}
    a = fc_input(model, layer, x)
    if not earlier:
        return a, {}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in names}

    def pulled(p, xi, gi):
        return (fc_input(model, layer, xi[None], {**p, **rest})[0] * gi).sum()

    return a, vmap(grad(pulled), in_dims=(None, 0, 0))(earlier, x, G)


def clients_logits(model, w, x):
    """The model's eval-mode forward with a different set of weights per client, all clients at once.
    w: {name: (C, *shape)}; x: (C, B, *image) -> (C, B, classes)."""
    with frozen(model):  # eval mode: the server cannot reproduce a client's dropout masks
        return vmap(lambda wc, xc: functional_call(model, wc, (xc,)))(w, x)


@contextlib.contextmanager
def frozen(model):
    """Eval mode, no weight gradients (only the dummy images are optimised); restored afterwards."""
    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
