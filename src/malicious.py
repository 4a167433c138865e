"""A malicious server that crafts the model it sends, the read-out of what clients send back, and the
client-side check that catches it.

Threat model. On the rounds it chooses, the server sends a crafted model instead of the global model;
clients train it with the unchanged client code (src.client.client_update, their defenses, their
precision) and send their update back as on any round. The server knows the protocol it announced
(learning rate, batch size, local epochs), the clients' sample counts (FedAvg weights by them) and its
public data (the dataset's test split); it does not know the shuffling, the dropout masks or the
clients' labels. The crafted round's updates are recorded, not aggregated: the global model after a
crafted round is the one before it.

Variants (--malicious-attack):

'imprint'  Robbing the Fed (Fowl et al., ICLR 2022): an imprint block of `bins` linear units beside the
           CNN, each unit a bin of one linear measurement of the image. It is an extra layer: the CNN has
           no spare layer to carry thousands of bins (fc1 has 128 units, behind two max-pools that keep
           no pixel exactly), so the crafted model is a different architecture, which a client accepts
           only if it trains whatever it is sent; the agreed-architecture check refuses it.
'loki'     The same block with `bins` per client (bins * clients units), each client sent a model in which
           only its own share is alive (LOKI, Zhao et al., S&P 2024, separates clients by per-client kernels):
           under secure aggregation every bin still sees one client only, and the aggregate says whose
           image each recovered one is.
'fc1'      The agreed architecture: trap rows on fc1 (Boenisch et al., "When the curious abandon
           honesty", EuroS&P 2023), each a random direction in conv-feature space whose bias lets only the
           client's most extreme image through. It reads out that image's conv features exactly, from
           which the image is estimated by inverting the (honest) conv stack; max-pooling loses what the
           estimate cannot bring back (measured: 1.75 % of a client's 1,600 images alone behind a trap,
           none recovered at 40 dB, the best estimate 18 dB).

How the imprint block reads an image out. Unit i of measurement group k computes
    a_i = (w_k . x - lo_i) * clip / (hi_i - lo_i),   h_i = hardtanh(a_i, 0, clip),
so it has a gradient only for the images whose measurement w_k . x lies in its bin [lo_i, hi_i): with
one such image z, its weight row moves by -lr * g * z and its bias by -lr * g, and the row's update is
z times a number (Fowl et al.'s (dW_i - dW_{i+1}) / (db_i - db_{i+1}), with the difference of adjacent
bins already taken by the hardtanh). The head adds g = gamma * u_y / batch to every bin's logit
gradient (u = +1, -1, +1, ... over the classes) and the CNN beside it is silenced (fc1, fc2 zero), so the
output stays near uniform, g never fades during local training and has the same sign at every visit.
Choices, measured on real digits (one standard FedAvg client, 16,000 bins, fp32, prototype runs):
- bins in `groups` measurements (the top principal directions of the public images), each with its own
  quantile-spaced bins: an image is recovered if it is alone in its bin in any group (a Bloom filter:
  groups = bins / images * ln 2 is best: 7 here, 98.5 % alone in some bin, where one group leaves
  exp(-0.1) = 90 %);
- one-hot (hardtanh) bins instead of cumulative (ReLU) ones: a row changes only when its own image
  passes, so bins barely drift during local training and no difference of two large sums is needed;
- the scale of each read-out from the image itself (8-bit pixels, the brightest 254 or 255 as in the
  public data), not from db: the bias is a large number whose small updates fp32 rounds away (dW / db
  recovered 0 % at 40 dB, this 96 %);
- `drift`, how far in bin widths one visit moves an image within its bin: larger drift means larger
  updates, less lost to fp32 rounding of the weights; 0.2, 0.5 and 1.0 gave 96.4, 95.7 and 96.0 %.
"""
import math

import torch
import torch.nn as nn

from src.data import MNIST_SPEC
from src.model import CNN, create_model, param_shapes
from src.server import parse_capture_rounds
from src.utils import UserError

VARIANTS = ('imprint', 'loki', 'fc1')
PIXELS = 28 * 28
CLIP = 1e-4        # the bins' output range: small, so the head barely learns (its gradient is this small)
DRIFT = 0.5        # bin widths one visit moves an image within its bin (see the module docstring)
MAX_GROUPS = 8


class ImprintCNN(CNN):
    """The agreed CNN plus an imprint block beside it, added to its logits: the crafted architecture.

    Its state dict is the CNN's plus 'imprint.weight' (bins, 784), 'imprint.bias', 'head.weight'
    (10, bins) and 'band_clip' (the hardtanh's upper end), so a state alone says how to build it.
    """

    def __init__(self, bins, clip=CLIP, num_classes=10):
        super().__init__()
        self.imprint = nn.Linear(PIXELS, bins)
        self.head = nn.Linear(bins, num_classes, bias=False)
        self.register_buffer('band_clip', torch.tensor(float(clip)))

    def forward(self, x):
        bands = torch.clamp(self.imprint(x.flatten(1)), 0.0, float(self.band_clip))  # hardtanh(0, clip)
        return super().forward(x) + self.head(bands)


def build_model(state, spec=MNIST_SPEC, model='cnn'):
    """The module a client trains for `state`: the agreed model, or the crafted architecture it names."""
    if 'imprint.weight' in state:
        return ImprintCNN(state['imprint.weight'].shape[0], float(state['band_clip']))
    return create_model(model, spec)


# ---------------------------------------------------------------------------------------------- crafting

def directions(public_x, k):
    """The top-k principal directions of the public images, (k, 784) float64 unit rows."""
    x = public_x.flatten(1).double().cpu()
    _, _, v = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return v[:k]


def kde_quantiles(values, masses, grid=4001):
    """The quantiles at `masses` (in (0, 1)) of a Gaussian-KDE-smoothed distribution of `values`.

    Smoothing matters because the bins are far finer than the public sample: 2,000 public images
    place 16,000 edges only through a smooth estimate of their distribution.
    """
    values = values.double().cpu()
    h = 1.06 * values.std() * len(values) ** -0.2  # Silverman's bandwidth
    xs = torch.linspace(float(values.min() - 5 * h), float(values.max() + 5 * h), grid, dtype=torch.float64)
    cdf = torch.zeros_like(xs)
    for chunk in values.split(256):
        cdf += torch.special.ndtr((xs[:, None] - chunk[None]) / h).sum(1)
    cdf /= len(values)
    masses = masses.double()
    j = torch.searchsorted(cdf, masses).clamp(1, grid - 1)
    frac = (masses - cdf[j - 1]) / (cdf[j] - cdf[j - 1]).clamp_min(1e-300)
    return xs[j - 1] + frac * (xs[j] - xs[j - 1])


def quantile_edges(values, bins):
    """bins + 1 edges splitting the smoothed distribution of `values` into equal masses; the outer two lie
    far in the tails, so no image falls outside the bins."""
    inner = kde_quantiles(values, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    spread = float(values.max() - values.min())
    return torch.cat([inner[:1] - 10 * spread, inner, inner[-1:] + 10 * spread])


def num_groups(bins, images):
    """Bloom-filter optimum of measurement groups for `images` sharing `bins` bins, 1..MAX_GROUPS."""
    return max(1, min(MAX_GROUPS, round(math.log(2) * bins / max(images, 1))))


def craft_imprint(global_state, public_x, bins, images, lr, batch_size, client_slices=None, clip=CLIP,
                  drift=DRIFT):
    """(crafted state, crafting parameters) for the imprint block.

    images: how many images share a bin set (one client's count; all clients' under secure
    aggregation with shared bins). client_slices: [(first row, end row)] per client for 'loki' (each
    slice gets its own groups and quantiles), or None for one set of bins shared by every client.
    """
    slices = client_slices or [(0, bins)]
    per_slice = min(hi - lo for lo, hi in slices)
    groups = num_groups(per_slice, images)
    w = directions(public_x, groups)
    proj = public_x.flatten(1).double().cpu() @ w.T                     # (public, groups)
    lower = torch.zeros(bins, dtype=torch.float64)
    upper = torch.zeros(bins, dtype=torch.float64)
    group = torch.full((bins,), -1, dtype=torch.int64)                  # -1: a row no bin uses (dead)
    for lo, hi in slices:
        per_group = (hi - lo) // groups
        for k in range(groups):
            rows = slice(lo + k * per_group, lo + (k + 1) * per_group)
            edges = quantile_edges(proj[:, k], per_group)
            lower[rows], upper[rows], group[rows] = edges[:-1], edges[1:], k
    live = group >= 0
    scale = torch.where(live, clip / (upper - lower).clamp_min(1e-12), torch.zeros_like(lower))
    weight = torch.zeros(bins, PIXELS, dtype=torch.float64)
    weight[live] = scale[live, None] * w[group[live]]
    bias = torch.where(live, -scale * lower, torch.full_like(lower, -1.0))  # dead rows: never above 0
    # g = gamma * u_y / batch per visit: gamma sets how far one visit moves an image in its bin
    mean_sq = float(public_x.flatten(1).double().square().sum(1).mean())
    gamma = drift * clip * batch_size / (lr * (mean_sq + 1))
    u = torch.tensor([(-1.0) ** c for c in range(10)])                   # zero mean over 10 classes
    state = {k: v.detach().cpu().clone() for k, v in global_state.items()}
    for k in ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'):       # silence the CNN: no gradient
        state[k] = torch.zeros_like(state[k])
    state.update({'imprint.weight': weight.float(), 'imprint.bias': bias.float(),
                  'head.weight': (gamma * u[:, None]).expand(10, bins).contiguous().float(),
                  'band_clip': torch.tensor(float(clip))})
    params = {'attack': 'loki' if client_slices else 'imprint', 'bins': bins, 'groups': groups,
              'clip': clip, 'drift': drift, 'gamma': gamma, 'directions': w.float(),
              'lower': lower, 'upper': upper, 'group': group,
              'client_rows': [list(s) for s in client_slices] if client_slices else None,
              'images_per_bin_set': images, 'public': 'the test split (the server\'s public data)'}
    return state, params


def sent_to(state, params, client):
    """The state the server sends `client`: for 'loki', every row outside the client's share is dead."""
    rows = params.get('client_rows') if params else None
    if not rows:
        return state
    lo, hi = rows[client]
    out = dict(state)
    keep = torch.zeros(state['imprint.bias'].shape[0], dtype=torch.bool)
    keep[lo:hi] = True
    out['imprint.weight'] = state['imprint.weight'] * keep[:, None]
    out['imprint.bias'] = torch.where(keep, state['imprint.bias'], torch.full_like(state['imprint.bias'], -1.0))
    return out


def craft(variant, global_state, public_x, bins, sizes, lr, batch_size, secure_aggregation, seed=0):
    """What a malicious server sends on a crafted round: (crafted state, [state sent to each client],
    crafting parameters). sizes: the clients' sample counts, which FedAvg's weights reveal."""
    clients = len(sizes)
    if variant == 'imprint':
        images = sum(sizes) if secure_aggregation else max(sizes)  # who shares the bins
        state, params = craft_imprint(global_state, public_x, bins, images, lr, batch_size)
    elif variant == 'loki':  # `bins` per client: the block has bins * clients units, one share alive per client
        slices = [(c * bins, (c + 1) * bins) for c in range(clients)]
        state, params = craft_imprint(global_state, public_x, bins * clients, max(sizes), lr, batch_size, slices)
    elif variant == 'fc1':
        state, params = craft_fc1(global_state, public_x, max(sizes), seed)
    else:
        raise ValueError(f'unknown malicious attack {variant!r}: choose one of {", ".join(VARIANTS)}')
    return state, [sent_to(state, params, c) for c in range(clients)], params


def craft_fc1(global_state, public_x, images, seed):
    """Trap rows on fc1, in the agreed architecture: row i is a random direction d_i in conv-feature
    space (the honest conv stack's), its bias at the public data's (1 - 1/images) quantile of d_i . features,
    so about one of a client's images passes it. fc2 and the conv layers stay as they were: nothing but
    fc1 changes, so fc2's rows give each trap a different logit gradient, which the per-row read-out
    does not mind."""
    model = CNN()
    model.load_state_dict({k: v.cpu() for k, v in global_state.items()})
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(chunk) for chunk in public_x.cpu().split(500)]).double()
    rows, dim = model.fc1.weight.shape
    d = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d /= d.norm(dim=1, keepdim=True)
    proj = feats @ d.T                                                   # (public, rows)
    level = 1 - 1 / max(images, 2)
    thresholds = torch.quantile(proj, level, dim=0)                      # empirical: the tail is what counts
    scale = 1.0 / proj.std(0).clamp_min(1e-12)                           # activations of order one
    state = {k: v.detach().cpu().clone() for k, v in global_state.items()}
    state['fc1.weight'] = (scale[:, None] * d).float()
    state['fc1.bias'] = (-scale * thresholds).float()
    params = {'attack': 'fc1', 'rows': rows, 'directions': d.float(), 'thresholds': thresholds, 'quantile': level,
              'images_per_bin_set': images, 'client_rows': None,
              'public': "the test split (the server's public data)"}
    return state, params


# ---------------------------------------------------------------------------------------------- read-out

# 8-bit images: the public data's brightest pixel is 254 or 255 in every MNIST image (Fashion-MNIST likewise
# near 255); an estimate is scaled so its brightest pixel is one of these, whichever puts it on the lattice
BRIGHTEST = (254, 255)
LATTICE_RESIDUAL = 0.15   # RMS distance of the dim pixels to the 8-bit lattice (grey levels): above, a collision
DIM = 64                  # pixels up to this grey level: bf16 rounds them by at most 64 / 2^9 = 0.125 levels


def lattice_fit(rows, brightest=BRIGHTEST):
    """Scale each row (a multiple of one 8-bit image, or a blend of several) onto [0, 1].

    Returns (images (M, 784) float64, RMS distance of their dim pixels to the k/255 lattice, in grey
    levels). An image alone in its bin is the row times one number, so some scale puts every pixel on the
    lattice, to fp32 precision, and its dim pixels (1..DIM levels) within bf16's relative rounding too; a
    blend of two images with unknown weights lands between the levels (half-levels for equal weights).
    """
    rows = rows.double()
    rows = rows * torch.where(rows.sum(1, keepdim=True) < 0, -1.0, 1.0)  # g's sign (the label's) is unknown
    top = rows.amax(1, keepdim=True).clamp_min(1e-300)
    best, best_res = None, None
    for k in brightest:
        est = rows / top * (k / 255)
        off = (est * 255 - (est * 255).round()).square()
        dim = ((est * 255) >= 0.5) & ((est * 255) <= DIM + 0.5)
        res = torch.where(dim.any(1), (off * dim).sum(1) / dim.sum(1).clamp_min(1), off.mean(1)).sqrt()
        if best is None:
            best, best_res = est, res
        else:
            better = res < best_res
            best = torch.where(better[:, None], est, best)
            best_res = torch.where(better, res, best_res)
    return best, best_res


CONFIRM_DB = 40.0         # two bins of different groups reading the same image this closely confirm each other


def confirmed_elsewhere(raw, groups, direction, window=16):
    """(M,) bool: the read-out of a bin is found again in a bin of another measurement group.

    An image alone in its bin in one group is usually alone in others too, and every such bin reads the
    same image; a blend of two images in one bin is not found elsewhere (the pair rarely shares a bin in
    two groups). Read-outs of one image have one measurement, so sorted by it they sit side by side: each
    is compared with its `window` neighbours, wherever bf16-rounded edges put its bins."""
    flat = raw.flatten(1).float()
    order = torch.argsort(raw.flatten(1).double() @ direction.double())
    ok = torch.zeros(len(raw), dtype=torch.bool)
    for step in range(1, min(window, len(raw) - 1) + 1):
        i, j = order[:-step], order[step:]
        pair = groups[i] != groups[j]
        i, j = i[pair], j[pair]
        mse = (flat[i] - flat[j]).square().mean(1).clamp_min(1e-12)
        same = 10 * torch.log10(1 / mse) >= CONFIRM_DB
        ok[i[same]] = True
        ok[j[same]] = True
    return ok


def read_imprint(delta, params, rows=None):
    """Every bin that moved, read out: {'rows', 'group', 'images' (M, 1, 28, 28) in [0, 1] (on the
    8-bit lattice), 'raw' (before rounding to it), 'residual' (grey levels), 'confirmed' (found again in
    another group), 'ratio' (Fowl et al.'s dW_i / db_i, where db_i survived fp32), 'claimed' (read as one
    image, not a collision: one sign, dim pixels on the 8-bit lattice)}.

    rows: a (first, end) row range (a 'loki' client's share), or None for all rows. 'confirmed' is kept as
    a second opinion: it cannot reject a pair of near-twins that shares a bin in two groups.
    """
    lo, hi = rows if rows is not None else (0, delta['imprint.weight'].shape[0])
    dW = delta['imprint.weight'][lo:hi].double().cpu()
    db = delta['imprint.bias'][lo:hi].double().cpu()
    moved = (dW != 0).any(1)
    index = moved.nonzero().squeeze(1)
    raw, residual = lattice_fit(dW[index])
    ratio = dW[index] / db[index, None]
    # one image: every pixel of the row has one sign; a blend of images whose g differ in sign does not
    one_sign = (raw >= -0.5 / 255).all(1)
    confirmed = confirmed_elsewhere(raw, params['group'][index + lo], params['directions'][0])
    claimed = one_sign & (residual <= LATTICE_RESIDUAL)
    images = (raw.clamp(0, 1) * 255).round() / 255
    return {'rows': index + lo, 'group': params['group'][index + lo], 'images': images.float().view(-1, 1, 28, 28),
            'raw': raw.float().view(-1, 1, 28, 28), 'residual': residual.float(), 'confirmed': confirmed,
            'ratio': ratio.float(), 'claimed': claimed}


# ---------------------------------------------------------------------------------------------- the check

DUPLICATE_COS = 0.9999    # two rows this parallel are copies (random or trained rows never are)
RANK_ONE_SHARE = 0.99     # the top singular value holding this share of a matrix's energy
SORTED_FRACTION = 0.9     # this share of consecutive thresholds -bias/|row| stepping the same way


QUIET_RATE = 0.01         # an fc1 unit that at most this share (or two) of the client's own images switch on
QUIET_UNITS = 0.5         # ... in this share of fc1's units: traps, each waiting for one image


def verify_received(state, agreed=None, images=None):
    """The client-side check (--client-verify), before training: [] to accept, else the reasons to refuse.

    First the agreed architecture, strictly (names and shapes). Then what crafted models share and honest
    ones (random init, then SGD) do not: a layer of zeros (a silenced branch), duplicated rows or a
    rank-one weight matrix (every bin measuring one quantity), sorted thresholds -b_i / |w_i| (bins at
    quantiles). Trap rows of random directions pass all of these, one row at a time; with `images` (some
    of the client's own) the check also counts fc1 units that almost none of them switch on.
    """
    agreed = agreed or param_shapes(CNN())
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != agreed:
        extra = sorted(set(got) - set(agreed))
        missing = sorted(set(agreed) - set(got))
        wrong = sorted(k for k in set(got) & set(agreed) if got[k] != agreed[k])
        return ['not the agreed architecture: ' + '; '.join(s for s in (
            f'unexpected {extra}' if extra else '', f'missing {missing}' if missing else '',
            ', '.join(f'{k} is {got[k]} not {agreed[k]}' for k in wrong)) if s)]
    reasons = []
    for name, t in state.items():
        if not name.endswith('weight'):
            continue
        rows = t.detach().cpu().reshape(t.shape[0], -1).double()
        if not rows.any():
            reasons.append(f'{name} is all zeros (a silenced layer)')
            continue
        norms = rows.norm(dim=1)
        unit = rows / norms[:, None].clamp_min(1e-300)
        cos = (unit @ unit.T).abs().fill_diagonal_(0)
        if float(cos.max()) > DUPLICATE_COS:
            i, j = divmod(int(cos.argmax()), len(rows))
            reasons.append(f'{name}: rows {i} and {j} are copies (|cos| {float(cos.max()):.6f})')
        if len(rows) >= 3:
            s = torch.linalg.svdvals(rows)
            share = float(s[0] ** 2 / s.square().sum())
            if share > RANK_ONE_SHARE:
                reasons.append(f'{name} is rank one ({share:.4f} of its energy in one direction)')
        bias = state.get(name[:-len('weight')] + 'bias')
        if bias is not None and len(bias) >= 16:
            steps = torch.sign((-bias.detach().cpu().double() / norms.clamp_min(1e-300)).diff())
            same = max(float((steps > 0).double().mean()), float((steps < 0).double().mean()))
            if same >= SORTED_FRACTION:
                reasons.append(f'{name[:-len("weight")]}bias: thresholds sorted ({same:.2f} of steps one way)')
    if images is not None and len(images):
        model = CNN()
        model.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
        with torch.no_grad():
            rate = (model.eval().fc1(model.features(images.detach().cpu().float())) > 0).double().mean(0)
        most = max(QUIET_RATE, 2 / len(images))                    # a trap lets about one image through
        quiet = float((rate <= most).double().mean())
        if quiet >= QUIET_UNITS:
            reasons.append(f'fc1: {quiet:.0%} of its units switch on for at most {most:.1%} of my '
                           f'{len(images)} images (traps)')
    return reasons


# ---------------------------------------------------------------------------------------------- settings

def validate_malicious(cfg, spec=None):
    """Refuse impossible malicious-server and client-check settings before any work, each with its flag."""
    if cfg['server'] not in ('honest', 'malicious'):
        raise UserError(f"server={cfg['server']!r}: choose 'honest' or 'malicious' (--server)")
    if cfg['server'] == 'honest' and not cfg['client_verify']:
        return
    if cfg.get('model', 'cnn') != 'cnn' or spec not in (None, MNIST_SPEC):
        raise UserError('--server malicious and --client-verify are built for the cnn on 28x28 one-channel images '
                        'of 10 classes (MNIST, Fashion-MNIST): use --model cnn with such a dataset')
    if cfg['engine'] != 'builtin':
        raise UserError('--server malicious and --client-verify run on the built-in engine only (--engine builtin)')
    if cfg['server'] != 'malicious':
        return
    if cfg['malicious_attack'] not in VARIANTS:
        raise UserError(f"malicious_attack={cfg['malicious_attack']!r}: choose one of {', '.join(VARIANTS)} "
                        f"(--malicious-attack)")
    try:
        crafted = parse_capture_rounds(cfg['malicious_rounds'], cfg['num_rounds'])
    except ValueError as e:
        raise UserError(f"{str(e).replace('capture_rounds', 'malicious_rounds')} (--malicious-rounds)") from None
    if not crafted:
        raise UserError("--server malicious needs at least one round to craft (--malicious-rounds '3,7')")
    if cfg['malicious_attack'] in ('imprint', 'loki'):  # loki: bins per client, the block holds them all
        most = 1_000_000 // (cfg['num_clients'] if cfg['malicious_attack'] == 'loki' else 1)
        if not (isinstance(cfg['malicious_bins'], int) and 2 <= cfg['malicious_bins'] <= most):
            raise UserError(f"malicious_bins={cfg['malicious_bins']}: need 2 to {most:,} bins (a block of at most "
                            f"1,000,000 units) (--malicious-bins)")


def crafted_rounds(cfg):
    """The rounds on which the server sends a crafted model (none for an honest server)."""
    if cfg.get('server', 'honest') != 'malicious':
        return set()
    return parse_capture_rounds(cfg['malicious_rounds'], cfg['num_rounds'])


VERIFY_IMAGES = 256  # how many of its own images a client runs through a received model to check it


def refusing_clients(cfg, sent, client_data):
    """The clients whose check (--client-verify) refuses the model they were sent: {client: reasons}."""
    if not cfg.get('client_verify'):
        return {}
    return {c: reasons for c, (state, (x, _)) in enumerate(zip(sent, client_data))
            if (reasons := verify_received(state, images=x[:VERIFY_IMAGES]))}
