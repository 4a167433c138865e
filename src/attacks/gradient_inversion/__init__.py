"""Gradient inversion: recover clients' training images and labels from the gradients they send.
See attack.py for the threat model and the methods, one file per idea:

    attack.py         the Attack: flags, observe (clients) -> run (server's view only) -> score
    clients.py        the clients' side: attacked images, their gradients, defenses, secure aggregation
    labels.py         labels from the last layer's bias gradient (iDLG, LLG counts)
    closed_form.py    fc1's input, batch separation, labels from fc1's output gradient
    layers.py         what the attack needs of any model: per-example gradients, per-client forward (torch.func)
    dlg.py            DLG / iDLG (L-BFGS, one image at a time)
    search.py         the default method's feature search, and the cosine search for batches
    invert.py         every intercepted gradient attacked with the chosen method
    fedavg_rounds.py  Geiping et al.'s multi-step attack on the recorded FedAvg updates
    scoring.py        matching, PSNR/SSIM/labels, recovered fractions, baselines (private data)
    figures.py        the two figures
"""
from src.attacks.gradient_inversion.attack import GradientInversion

__all__ = ['GradientInversion']
