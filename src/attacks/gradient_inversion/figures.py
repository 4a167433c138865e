"""The gradient attack's figures: originals above reconstructions, and the leakage per FedAvg round."""
from src.plots import as_pixels, draw, save_image_grid
from src.utils import atomic_path

MAX_SHOWN = 16  # images in the reconstruction figure


def plot_reconstructions(path, originals, true_labels, cases, suptitle):
    """Originals (label) above each case's reconstructions (an X where failed, recovered label, PSNR).
    cases: [(row label, reconstructions (N, C, H, W) in the originals' order, per_image metrics)]."""
    n = min(len(originals), MAX_SHOWN)
    rows = [list(as_pixels(originals[:n]))]
    titles = [[f'label {int(y)}' for y in true_labels[:n]]]
    for _, recon, per_image in cases:
        rows.append(list(as_pixels(recon[:n])))
        titles.append([f"{'X ' if p['failed'] else ''}{p['recovered_label']} {p['psnr']:.1f}dB" for p in per_image[:n]])
    save_image_grid(path, rows, titles, row_labels=['original'] + [c[0] for c in cases], suptitle=suptitle)


def plot_rounds(path, rounds, shown):
    """PSNR per captured round (mean and best dummy, next to the two no-attack guesses), and each round's
    best dummy above the client image it matched."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    x = [r['round'] for r in rounds]
    n = len(shown)
    fig = plt.figure(figsize=(max(6.0, 1.1 * n), 5.5))
    grid = fig.add_gridspec(3, n, height_ratios=[2.2, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    ax.plot(x, [r['psnr_mean'] for r in rounds], 'o-', label='reconstruction, mean over dummies')
    ax.plot(x, [r['psnr_max'] for r in rounds], 's-', label='reconstruction, best dummy (mean over clients)')
    ax.plot(x, [r['mean_image_psnr_mean'] for r in rounds], 'k--', label='public mean image (no attack)')
    ax.plot(x, [r['black_image_psnr_max'] for r in rounds], 'k:', label='black image, nearest client image (no attack)')
    ax.set_xlabel('FedAvg round')
    ax.set_ylabel('PSNR to nearest client image (dB)')
    ax.set_title('leakage from recorded FedAvg updates, per round', fontsize=9)
    ax.legend(fontsize=7)
    for i, (rnd, rec, real, p) in enumerate(shown):
        for k, (img, title) in enumerate([(rec, f'r{rnd} {p:.1f}dB'), (real, 'nearest real')]):
            a = fig.add_subplot(grid[1 + k, i])
            draw(a, img)
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(title, fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    plt.close(fig)
