"""DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020): L-BFGS on the gradient distance, one image at a time,
as the papers run it."""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from src.attacks.gradient_inversion.layers import flat, output_bias, per_example_grads
from src.attacks.gradient_inversion.labels import recover_labels
from src.attacks.gradient_inversion.search import relative_distance

ITERATIONS = 300  # L-BFGS steps, as the papers' code
ATTEMPTS = 3      # a diverged image is restarted from fresh noise up to twice


def dlg_lbfgs(model, grads, label, iterations, soft_label, generator):
    """DLG (soft_label: a dummy label optimised too) or iDLG (`label` given) on one gradient of one image:
    L-BFGS on the L2 gradient distance.

    The distance is divided by |target gradient|^2, a constant, so the minimiser is the papers'
    but fp32 L-BFGS does not stall on the tiny gradients of a trained model. It stops early once the
    distance is non-finite or 1000x its first value (diverged).
    Returns (image (1, C, H, W), label (1,), final distance (1,)).
    """
    target = flat(grads)
    device, classes = target.device, model.spec.num_classes
    x = torch.rand(1, *model.spec.shape, generator=generator).to(device).requires_grad_(True)
    params = [x]
    if soft_label:
        y = torch.randn(1, classes, generator=generator).to(device).requires_grad_(True)
        params.append(y)
    else:
        y_onehot = F.one_hot(label.view(1), classes).float()
    # as the papers' code: LBFGS(lr=1) with its defaults (up to 20 inner iterations per step), stepped
    # `iterations` times
    opt = torch.optim.LBFGS(params, lr=1)

    def closure():
        opt.zero_grad()
        t = F.softmax(y, 1) if soft_label else y_onehot
        d = relative_distance(flat(per_example_grads(model, x, t, create_graph=True)), target).sum()
        if torch.isfinite(d):
            d.backward()
        return d

    first = None
    for _ in range(iterations):
        d = opt.step(closure)
        first = d.item() if first is None else first
        if not torch.isfinite(d) or d.item() > 1e3 * first:  # diverged: the caller restarts
            break
    with torch.no_grad():
        t = F.softmax(y, 1) if soft_label else y_onehot
    with torch.enable_grad():
        d = relative_distance(flat(per_example_grads(model, x.detach().requires_grad_(True), t)), target)
    lab = t.argmax(1) if soft_label else label.view(1)
    return x.detach(), lab, d.detach()


def dlg_attack(model, grads, method, iterations, generator, progress=True):
    """DLG or iDLG on every single-image gradient in grads ({name: (n, *shape)}), one at a time; an image
    whose result is non-finite is restarted from fresh noise, up to ATTEMPTS tries, then reported failed.
    Returns (images (n, C, H, W), labels (n,), failed (n,), restarted (n,))."""
    bias = output_bias(model)
    n = grads[bias].shape[0]
    images, labels, failed, restarted = [], [], [], []
    recovered = recover_labels(grads[bias], 1)[:, 0]
    for i in tqdm(range(n), desc=method, unit='image', leave=False, disable=not progress):
        one = {k: v[i:i + 1] for k, v in grads.items()}
        for attempt in range(ATTEMPTS):
            x, lab, d = dlg_lbfgs(model, one, recovered[i], iterations, method == 'dlg', generator)
            ok = bool(torch.isfinite(x).all() and torch.isfinite(d).all())
            if ok:
                break
        images.append(x.clamp(0, 1) if ok else torch.zeros_like(x))
        labels.append(lab)
        failed.append(not ok)
        restarted.append(attempt > 0)
    return torch.cat(images), torch.cat(labels), torch.tensor(failed), torch.tensor(restarted)
