"""The only parts of the gradient attack that know the CNN's layers (src.model.CNN): its forward pass
split at the layers whose gradients leak, each example's gradient in one pass, and a forward pass
with one set of weights per client. layers.py has the same for any model (torch.func); these are
written out for the CNN because they are several times faster on the CPU."""
import torch
import torch.nn.functional as F


def forward_parts(model, x):
    """The eval-mode forward up to fc1's input: (normalised input, conv1 output, pooled conv1,
    conv2 output, fc1's input a2 (N, 1600 for 28x28))."""
    z = model.spec.normalise(x)
    c1 = model.conv1(z)
    p1 = F.max_pool2d(F.relu(c1), 2)
    c2 = model.conv2(p1)
    a2 = F.max_pool2d(F.relu(c2), 2).flatten(1)
    return z, c1, p1, c2, a2


def per_example_grads(model, x, targets, create_graph=False):
    """Gradient of each example's cross-entropy (soft targets (N, classes)) w.r.t. every weight, (N, *shape).

    One forward and one backward for the whole batch: autograd gives the gradient at each layer's
    output, and each weight gradient is that times the layer's input (an outer product for FC
    layers, a product with the unfolded input patches for convolutions). Eval mode (no dropout):
    the attacker cannot reproduce a client's mask.
    """
    if not x.requires_grad:  # the layer-output gradients need a graph even when x is data
        x = x.detach().requires_grad_(True)
    z, c1, p1, c2, a2 = forward_parts(model, x)
    f1 = model.fc1(a2)
    h = F.relu(f1)
    logits = model.fc2(h)
    loss = -(targets * F.log_softmax(logits, 1)).sum()
    d_out, d_f1, d_c2, d_c1 = torch.autograd.grad(loss, [logits, f1, c2, c1], create_graph=create_graph)
    n = len(x)
    return {
        'conv1.weight': torch.bmm(d_c1.flatten(2), F.unfold(z, 3).transpose(1, 2)).view(n, *model.conv1.weight.shape),
        'conv1.bias': d_c1.sum((2, 3)),
        'conv2.weight': torch.bmm(d_c2.flatten(2), F.unfold(p1, 3).transpose(1, 2)).view(n, *model.conv2.weight.shape),
        'conv2.bias': d_c2.sum((2, 3)),
        'fc1.weight': d_f1[:, :, None] * a2[:, None, :],
        'fc1.bias': d_f1,
        'fc2.weight': d_out[:, :, None] * h[:, None, :],
        'fc2.bias': d_out,
    }


def clients_logits(spec, w, x):
    """The CNN's eval-mode forward with a different set of weights per client, all clients at once.

    w: {name: (C, *shape)}; x: (C, B, channels, H, W). Clients become channel groups of grouped
    convolutions and batch dimensions of bmm, so C local trainings run as one computation.
    """
    C, B = x.shape[:2]
    z = spec.normalise(x.flatten(0, 1)).view(x.shape).transpose(0, 1).reshape(B, -1, *x.shape[3:])
    c1 = F.conv2d(z, w['conv1.weight'].flatten(0, 1), w['conv1.bias'].flatten(), groups=C)
    p1 = F.max_pool2d(F.relu(c1), 2)
    c2 = F.conv2d(p1, w['conv2.weight'].flatten(0, 1), w['conv2.bias'].flatten(), groups=C)
    a2 = F.max_pool2d(F.relu(c2), 2).reshape(B, C, -1).transpose(0, 1)  # (C, B, 1600 for 28x28), the CNN's order
    h = F.relu(torch.baddbmm(w['fc1.bias'][:, None], a2, w['fc1.weight'].transpose(1, 2)))
    return torch.baddbmm(w['fc2.bias'][:, None], h, w['fc2.weight'].transpose(1, 2))  # (C, B, classes)
