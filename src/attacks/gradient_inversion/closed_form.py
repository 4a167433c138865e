"""What a fully connected layer's gradient gives away exactly: its input (one image), each image's
input and output gradient (batches whose units separate them), and from those the labels."""
import torch


def recover_fc_input(weight_grad, bias_grad):
    """Input of a linear layer from its gradients, batch size 1: rows of dW are dL/db_i * input.

    Least squares over all rows (weighted by dL/db_i), so it is exact whenever any dL/db_i != 0.
    weight_grad (N, out, in), bias_grad (N, out) -> (N, in).
    """
    return torch.einsum('no,noi->ni', bias_grad, weight_grad) / bias_grad.pow(2).sum(1, keepdim=True).clamp_min(1e-30)


def separate_fc_inputs(weight_grad, bias_grad, batch_size, tol=1e-3, nonnegative=True):
    """Each image's fc1 input from one batch gradient, or None if the gradient does not give them all.

    dL/dW_fc1 = (1/B) sum_b d_b a2_b^T: row i is a mix of the images whose fc1 unit i is active
    (ReLU, and dropout when on). A unit active for one image only gives that image's a2 exactly
    (row / bias gradient), and such rows repeat for every unit exclusive to that image. Candidates
    are the row ratios, grouped when equal, kept if non-negative where the layer's input is (after ReLU and
    max-pool, as the CNN's a2),
    most repeated first, each added if outside the span of those kept. Success when B of them
    explain the whole weight gradient (relative residual < tol). Returns (a2 (B, in), d (B, out)).
    """
    ok = bias_grad.abs() > 1e-6 * bias_grad.abs().max()
    rows = weight_grad[ok] / bias_grad[ok, None]
    norms = rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    close = ((rows[:, None] - rows[None]).norm(dim=2) / norms) < tol  # (k, k)
    groups, seen = [], torch.zeros(len(rows), dtype=torch.bool)
    for i in range(len(rows)):
        if not seen[i]:
            members = close[i] & ~seen
            seen |= members
            groups.append((int(members.sum()), rows[members].mean(0)))
    groups.sort(key=lambda g: -g[0])
    chosen = []
    for _, cand in groups:
        if nonnegative and cand.min() < -tol * cand.abs().max():
            continue
        if chosen:
            A = torch.stack(chosen)
            coef = torch.linalg.lstsq(A.T, cand[:, None]).solution
            if (A.T @ coef - cand[:, None]).norm() < tol * cand.norm():
                continue
        chosen.append(cand)
        if len(chosen) == batch_size:
            break
    if len(chosen) < batch_size:
        return None
    A = torch.stack(chosen)  # (B, in)
    Dt = torch.linalg.lstsq(A.T, weight_grad.T).solution  # dW^T = A^T (D^T/B)^T  ->  (B, out) = d_b / B
    if (A.T @ Dt - weight_grad.T).norm() > tol * weight_grad.norm():
        return None
    return A, Dt * batch_size


def labels_from_fc1_output_grads(model, d):
    """Labels from each image's gradient at fc1's output, d (N, 128).

    Where unit i is active (and kept by dropout), d_i = c * (W_fc2^T (p - onehot(y)))_i with c = 1,
    or 1/(1-p) under dropout; elsewhere d_i = 0. Solving on the nonzero units gives p - onehot(y)
    up to that positive scale, and its only negative entry is the label (as iDLG's).
    """
    out = []
    for row in d:
        active = row.abs() > 1e-6 * row.abs().max()
        e = torch.linalg.lstsq(model.fc2.weight[:, active].T, row[active, None]).solution[:, 0]
        out.append(int(e.argmin()))
    return torch.tensor(out, device=d.device)
