"""One self-contained HTML page from an attack run: config, accuracy per round, every figure
(embedded), every attack's metrics, and a plain-language reading of what leaked."""
import base64
import html
import io
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from src.utils import atomic_path  # noqa: E402

SECTIONS = [  # (metrics key, title, figures)
    ('gradient_inversion', 'Gradient inversion',
     ['gradient_inversion_idlg.png', 'gradient_inversion_rounds.png', 'gradient_inversion_batch.png']),
    ('model_inversion', 'Model inversion (confidence maximisation)', ['model_inversion_all.png']),
    ('gan_inversion', 'GAN-based model inversion (GMI)', ['gan_inversion_all.png', 'gan_samples.png']),
]

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd;margin:.3em 0}
.reading{background:#f6f8fa;border-left:4px solid #4a7;padding:.6em 1em}code{font-size:.9em}"""


def _img_tag(png_bytes, alt):
    data = base64.b64encode(png_bytes).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value):
    if isinstance(value, float):
        return f'{value:.4g}'
    return html.escape(str(value))


def scalar_rows(metrics, prefix=''):
    """(dotted name, value) for every number, string or bool in nested dicts; lists are skipped
    (per-image values live in metrics.json and reconstructions.npz)."""
    rows = []
    for key, value in metrics.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            rows += scalar_rows(value, name + '.')
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((name, value))
    return rows


def _table(rows):
    body = ''.join(f'<tr><td><code>{html.escape(k)}</code></td><td>{_fmt(v)}</td></tr>' for k, v in rows)
    return f'<table><tr><th>metric</th><th>value</th></tr>{body}</table>'


def accuracy_plot(history):
    rounds = [r['round'] for r in history['rounds']]
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.plot(rounds, [100 * r['test_accuracy'] for r in history['rounds']], marker='o')
    ax.set_xlabel('round')
    ax.set_ylabel('test accuracy (%)')
    ax.grid(alpha=.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(path, metrics, history, figures_dir, reading):
    """Write report.html atomically; `reading` is a list of plain-language sentences."""
    cfg = history['config']
    parts = [f'<!doctype html><html><head><meta charset="utf-8"><title>FL privacy attack report</title>'
             f'<style>{CSS}</style></head><body>',
             '<h1>Federated learning privacy attack report</h1>',
             f'<p>Model <code>{html.escape(metrics.get("model", ""))}</code>, trained on '
             f'<b>{html.escape(cfg["dataset"])}</b>, {cfg["num_clients"]} clients, {cfg["num_rounds"]} rounds, '
             f'{cfg["local_epochs"]} local epochs, {html.escape(cfg["data_distribution"])}; final test accuracy '
             f'<b>{100 * history["final_test_accuracy"]:.2f} %</b>.</p>',
             '<h2>What leaked</h2><div class="reading">'
             + ''.join(f'<p>{html.escape(s)}</p>' for s in reading) + '</div>',
             '<h2>Training</h2>', _img_tag(accuracy_plot(history), 'test accuracy per round'),
             _table(sorted(cfg.items()))]
    for key, title, figures in SECTIONS:
        if key not in metrics:
            continue
        parts.append(f'<h2>{html.escape(title)}</h2>')
        for name in figures:
            fig_path = os.path.join(figures_dir, name)
            if os.path.isfile(fig_path):
                with open(fig_path, 'rb') as f:
                    parts.append(_img_tag(f.read(), name))
        parts.append(_table(scalar_rows(metrics[key])))
    parts.append(f'<p>Versions: {_fmt(metrics.get("versions", ""))}</p></body></html>')
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(parts))


def plain_reading(metrics):
    """A few sentences on what leaked, from the numbers in metrics.json."""
    out = []
    gi = metrics.get('gradient_inversion')
    if gi and 'main' in gi:
        m, base = gi['main'], gi.get('baselines', {})
        mean_img = base.get('dataset_mean_psnr_mean')
        verdict = ('recognisable copies of the private images' if m['psnr_mean'] >= 25 else
                   'blurred but partly recognisable images' if m['psnr_mean'] >= 18 else
                   'little more than a generic digit shape')
        out.append(f"Gradient inversion: from one intercepted gradient per image, the server rebuilt "
                   f"{verdict}: {m['psnr_mean']:.1f} dB mean PSNR (worst {m['psnr_min']:.1f} dB), "
                   f"{100 * m['label_accuracy']:.0f} % of labels recovered"
                   + (f", against {mean_img:.1f} dB for simply guessing the dataset-mean image." if mean_img else '.'))
    mi = metrics.get('model_inversion')
    if mi and 'overall' in mi:
        acc = mi['overall']['best_restart']['attack_accuracy']
        out.append(f"Model inversion: maximising the global model's confidence gave one image per class that an "
                   f"independent classifier assigns to the right class {100 * acc:.0f} % of the time. These are "
                   f"class representatives the model accepts, not copies of any client's image (see the KNN "
                   f"distances).")
    gmi = metrics.get('gan_inversion')
    if gmi and 'attack_accuracy' in gmi:
        out.append(f"GAN inversion: with a generator trained only on the server's own public data "
                   f"({gmi.get('public_data', {}).get('name', 'public data')}), the search found digits the "
                   f"independent classifier accepts as the target class {100 * gmi['attack_accuracy']:.0f} % of "
                   f"the time (best restart; {100 * gmi['attack_accuracy_all_restarts']:.0f} % over all restarts).")
        mi_knn = (mi or {}).get('overall', {}).get('best_restart', {}).get('knn_feature_distance')
        if mi_knn is not None and gmi.get('knn_feature_distance') is not None:
            closer = 'closer to' if gmi['knn_feature_distance'] < mi_knn else 'no closer to'
            out.append(f"The GAN's images are {closer} real private digits than model inversion's "
                       f"(nearest-private-image distance in the evaluation classifier's features: "
                       f"{gmi['knn_feature_distance']:.2f} vs {mi_knn:.2f}).")
    if metrics.get('training_defenses'):
        out.append(f"Defenses active during training: {', '.join(metrics['training_defenses'])}.")
    return out
