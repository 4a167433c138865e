"""One self-contained HTML page from an attack run: config, accuracy per round, and per attack what it
declares (src.attacks.base.Attack: title, headline numbers, figures), then all its metrics."""
import base64
import html
import io
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from src.utils import atomic_path  # noqa: E402

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


def format_value(value, kind):
    if value is None:
        return 'n/a'
    if kind == 'fraction':
        return f'{100 * value:.0f} %'
    if kind == 'db':
        return f'{value:.1f} dB'
    if kind == 'seconds':
        return f'{value:.1f} s'
    return f'{value:.3g}' if isinstance(value, float) else str(value)


def reading(metrics, attacks):
    """One plain sentence per attack: its summary line, then the numbers it declares as its headline."""
    out = []
    for attack in attacks:
        m = metrics.get(attack.key)
        if not m:
            continue
        numbers = '; '.join(f'{label}: {format_value(v, kind)}' for label, kind, v in attack.headline_values(m))
        out.append(f'{attack.title}: {numbers}. ({m.get("summary", "")})')
    if metrics.get('training_defenses'):
        out.append(f"Defenses active during training: {', '.join(metrics['training_defenses'])}.")
    return out


def write_report(path, metrics, training, figures_dir, attacks):
    """Write report.html atomically: the run, a reading of what leaked, then per attack (in the order
    given, as each attack declares them) its headline numbers, its figures and all its metrics."""
    cfg = training['config']
    parts = [f'<!doctype html><html><head><meta charset="utf-8"><title>FL privacy attack report</title>'
             f'<style>{CSS}</style></head><body>',
             '<h1>Federated learning privacy attack report</h1>',
             f'<p>Model <code>{html.escape(metrics.get("model", ""))}</code>, trained on '
             f'<b>{html.escape(cfg["dataset"])}</b>, {cfg["num_clients"]} clients, {cfg["num_rounds"]} rounds, '
             f'{cfg["local_epochs"]} local epochs, {html.escape(cfg["data_distribution"])}; final test accuracy '
             f'<b>{100 * training["final_test_accuracy"]:.2f} %</b>.</p>',
             '<h2>What leaked</h2><div class="reading">'
             + ''.join(f'<p>{html.escape(s)}</p>' for s in reading(metrics, attacks)) + '</div>',
             '<h2>Training</h2>', _img_tag(accuracy_plot(training), 'test accuracy per round'),
             _table(sorted(cfg.items()))]
    for attack in attacks:
        if attack.key not in metrics:
            continue
        parts.append(f'<h2>{html.escape(attack.title)}</h2>')
        rows = ''.join(f'<tr><td>{html.escape(label)}</td><td><b>{html.escape(format_value(v, kind))}</b></td></tr>'
                       for label, kind, v in attack.headline_values(metrics[attack.key]))
        parts.append(f'<table><tr><th>headline</th><th>value</th></tr>{rows}</table>')
        for name in attack.figures:
            fig_path = os.path.join(figures_dir, name)
            if os.path.isfile(fig_path):
                with open(fig_path, 'rb') as f:
                    parts.append(_img_tag(f.read(), name))
                caption = attack.metric(metrics[attack.key], attack.captions[name]) if name in attack.captions else None
                if caption:
                    parts.append(f'<p>{html.escape(caption)}</p>')
        parts.append(_table(scalar_rows(metrics[attack.key])))
    parts.append(f'<p>Versions: {_fmt(metrics.get("versions", ""))}</p></body></html>')
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        f.write('\n'.join(parts))
