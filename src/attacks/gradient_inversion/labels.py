"""Labels read off the last layer's bias gradient: iDLG (Zhao et al. 2020) for one image, LLG
(Wainakh et al. 2022) counts for batches."""
import torch


def recover_labels(fc2_bias_grad, batch_size):
    """Labels of each intercepted batch from the last layer's bias gradient, (n_batches, batch_size).

    For cross-entropy, dL/db_fc2 = mean_i (p_i - onehot(y_i)): the true label is the only negative
    entry for one image (iDLG). For batches, Wainakh et al. 2022 (LLG): every class with a negative
    entry is present, and the counts follow from the size of the negative entries; B * (-db_j) is
    count_j minus the model's summed confidence in class j, so counts are apportioned to the
    negative mass (largest remainder), at least one per present class.
    """
    g = fc2_bias_grad
    if batch_size == 1:
        return g.argmin(1, keepdim=True)
    labels = []
    for row in g:
        neg = (-row).clamp_min(0)
        present = (neg > 0).nonzero().flatten().tolist() or [int(row.argmin())]
        counts = {c: 1 for c in present[:batch_size]}
        left = batch_size - len(counts)
        if left > 0:
            share = neg / neg.sum().clamp_min(1e-30) * batch_size  # expected counts from the mass
            extra = {c: max(0.0, share[c].item() - 1) for c in counts}
            for _ in range(left):  # largest remaining expected count gets the next image
                c = max(extra, key=extra.get)
                counts[c] += 1
                extra[c] -= 1
        labels.append(sorted(c for c, k in counts.items() for _ in range(k)))
    return torch.tensor(labels, dtype=torch.long, device=g.device)
