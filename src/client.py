"""A client's local training: E epochs of plain SGD on its own data, starting from the global model."""
import torch
import torch.nn.functional as F

from src.utils import autocast


def client_update(model, images, labels, epochs, batch_size, lr, precision='fp32', generator=None,
                  progress=None):
    """Train `model` in place on (images, labels) and return (state_dict, num_samples).

    `images` is a float tensor (N, C, H, W) already on the model's device; batches are
    index slices of it (no DataLoader: the data is small and already in memory).
    The shuffle order comes from `generator`; dropout draws its masks from
    `model.dropout.generator`, which the caller seeds per (round, client).
    """
    device = images.device
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(labels)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            with autocast(device, precision):
                loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress.update(len(idx))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, n
