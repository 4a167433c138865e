"""Figures drawn with matplotlib: image grids (torchvision's save_image is not importable with CPU torch here)
and ROC curves."""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from src.utils import atomic_path  # noqa: E402


def as_pixels(images):
    """Tensor images (N, C, H, W) or one (C, H, W) in [0, 1] -> what matplotlib draws and npz files keep:
    (N, H, W) / (H, W) for one channel (grey), (N, H, W, C) / (H, W, C) for colour."""
    x = images.detach().float().cpu()
    return (x.squeeze(-3) if x.shape[-3] == 1 else x.movedim(-3, -1)).numpy()


def draw(ax, image):
    """One image in [0, 1] from as_pixels: grey in grey, colour in colour."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    ax.imshow(image, cmap='gray' if image.ndim == 2 else None, vmin=0, vmax=1)


def save_image_grid(path, rows, titles=None, row_labels=None, suptitle=None, cell=1.3):
    """Save a grid of images in [0, 1].

    rows: list of rows, each a sequence of (H, W) grey or (H, W, C) colour arrays (as_pixels; None leaves a
    cell empty);
    titles: matching nested list of strings shown above each image.
    """
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + 0.5 * bool(suptitle)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            image = row[j] if j < len(row) else None
            if image is None:
                ax.axis('off')
                continue
            draw(ax, image)
            if titles is not None and titles[i][j]:
                ax.set_title(titles[i][j], fontsize=7)
        if row_labels is not None:
            axes[i][0].set_ylabel(row_labels[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)


def save_roc_curves(path, curves, title):
    """Log-log ROC curves (as LiRA draws them: the low-FPR end is what matters). curves: {label: (fpr, tpr)};
    a label containing 'no attack' is drawn dashed."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for label, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), ls='--' if 'no attack' in label else '-', label=label)
    ax.plot([1e-5, 1], [1e-5, 1], color='gray', lw=0.8, ls=':', label='chance')
    ax.set(xscale='log', yscale='log', xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel='false positive rate',
           ylabel='true positive rate', title=title)
    ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)
