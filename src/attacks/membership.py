"""Membership inference (Shokri et al. 2017): was this image in a client's training data?

The game (Carlini et al. 2022, "Membership Inference Attacks From First Principles", sec. III): a
challenger (`observe`, the clients' side) draws candidates, half members (images the clients trained on)
and half non-members (images of the same task no client trained on: a part of the public test split that
is withheld from the server for this attack), and hands the server the shuffled images with their labels,
never which is which. The attacker scores every candidate (higher = member); `score` measures ROC AUC,
TPR at 0.1 % and 1 % FPR and the empirical epsilon those rates imply.

Two views the server really has:
  the final model (black box, per-example logits):
    LiRA, OFFLINE (Carlini et al. 2022, sec. VI): S shadow models trained on random halves of the server's
      remaining public data as the announced protocol trains (rounds x local epochs passes, its batch size
      and learning rate), never on a candidate; score = (phi_target(x) - mean_s phi_s(x)) / the shadows'
      global std (fixed variance: better with few shadows, sec. VI-B), phi = log(p_y / (1 - p_y)).
      Offline needs no member image and costs S trainings once, not S per candidate.
    loss threshold (Yeom et al. 2018): score = -cross-entropy.
  a client's recorded update (white box): the server sent weights w and received the update d; a candidate
    scores cos(d, -grad_w loss(w; x, y)) (gradient alignment: Li, Li & Ribeiro, ICLR 2023, "Effective passive
    membership inference attacks in federated learning against overparameterized models"): local SGD moves
    the weights along its members' negative gradients. A secure aggregate is attacked the same way
    (membership in any client's data).

No-attack baseline: the same scores against a reference model and a reference update (from the same sent
weights) trained on the server's public data only, which saw no candidate. Their AUC is what member and
non-member images differ by as DATA (mnist-10k's test digits are all from NIST SD-1's writers, 5,000 of its
8,000 training digits from SD-3's), not by membership: an attack counts by how far it lies above that, not
above 0.5.

Empirical epsilon (Jagielski et al. 2020; Nasr et al. 2021): (eps, delta)-DP bounds every test by
TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta, so eps >= ln((TPR - delta) / FPR). The threshold is
chosen on one half of the candidates and the bound evaluated on the other, with Clopper-Pearson 95 %
intervals (TPR at its lower end, FPR at its upper end), so a small sample cannot overclaim.
"""
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch.func import functional_call, grad, vmap

from src.attacks.base import Attack, Observation, Report
from src.batched_training import train_stacked
from src.client import client_update
from src.model import CNN, create_model, dropouts, seed_dropout
from src.plots import save_roc_curves
from src.utils import UserError, derive_seed, map_in_threads, resolve_precision

FPRS = {'tpr_at_0_1pct_fpr': 0.001, 'tpr_at_1pct_fpr': 0.01}
CONFIDENCE = 0.95  # of the Clopper-Pearson intervals behind the empirical epsilon


def add_arguments(parser):
    g = parser.add_argument_group('membership', 'membership inference: LiRA (offline) and loss threshold on the '
                                                'final model, gradient alignment on client updates')
    g.add_argument('--mia-candidates', type=int, default=1000,
                   help='members, and as many non-members (at most half the public split), per game')
    g.add_argument('--mia-shadows', type=int, default=16, help='LiRA shadow models (>= 2)')
    g.add_argument('--mia-rounds', default='first,last',
                   help="recorded rounds whose client updates are attacked: 'first,last', 'all' or numbers "
                        "like '1,10'; the last one is the headline")


def check_args(settings):
    if settings.mia_candidates < 10:
        raise UserError(f'--mia-candidates {settings.mia_candidates}: need at least 10')
    if settings.mia_shadows < 2:
        raise UserError(f'--mia-shadows {settings.mia_shadows}: LiRA needs at least 2 shadow models')
    spec = settings.mia_rounds.replace(' ', '')
    if spec not in ('all', 'first,last') and not all(p.isdigit() for p in spec.split(',')):
        raise UserError(f"--mia-rounds {settings.mia_rounds!r}: use 'first,last', 'all' or round numbers like '1,10'")


def training_recipe(cfg):
    """(passes over its data, batch size, learning rate) of one client's training in the announced protocol."""
    return cfg['num_rounds'] * cfg['local_epochs'], cfg['batch_size'], cfg['learning_rate']


def train_models(pool_x, pool_y, count, size, recipe, seed, device, global_state=None, make=CNN, batched=None):
    """`count` models of the target's architecture (make() builds one), each trained by client_update on its
    own random `size` images of the pool, from `global_state` or a seeded init: in parallel on the CPU's cores
    (one intra-op thread each, as clients train), or the CNN's all as one computation by src.batched_training,
    with the same shuffling and dropout masks: batched=None picks that on CUDA, as the trainer 'auto' does."""
    epochs, batch_size, lr = recipe
    precision = resolve_precision('auto', device)
    models, jobs = [], []
    with torch.random.fork_rng(devices=[]):  # seeded inits without touching the caller's RNG
        for s in range(count):
            torch.manual_seed(derive_seed(seed, 'shadow-init', s))
            model = make().to(device, memory_format=torch.channels_last)
            if global_state is not None:
                model.load_state_dict(global_state)
            seed_dropout(model, torch.Generator(device).manual_seed(derive_seed(seed, 'shadow-dropout', s)))
            order = torch.Generator().manual_seed(derive_seed(seed, 'shadow-data', s))
            idx = torch.randperm(len(pool_y), generator=order)[:size].to(device)
            models.append(model)
            jobs.append((model, pool_x[idx], pool_y[idx], order))

    if (device.type == 'cuda' if batched is None else batched) and isinstance(models[0], CNN):
        return train_stacked([(x, y) for _, x, y, _ in jobs], [m.state_dict() for m in models], epochs, batch_size,
                             lr, dropouts(models[0])[0].p, precision, [order for *_, order in jobs],
                             [dropouts(m)[0].generator for m in models], spec=models[0].spec)

    def one(job):
        model, x, y, order = job
        return client_update(model, x, y, epochs, batch_size, lr, precision, order)[0]

    return map_in_threads(one, jobs, 1 if device.type != 'cpu' else min(count, torch.get_num_threads()))


@torch.no_grad()
def logit_confidence(model, x, y, batch=1000):
    """phi = log(p_y / (1 - p_y)) per example, computed stably as z_y - logsumexp of the other logits."""
    model.eval()
    out = []
    for s in range(0, len(y), batch):
        z = model(x[s:s + batch]).float()
        zy = z.gather(1, y[s:s + batch, None]).squeeze(1)
        others = z.scatter(1, y[s:s + batch, None], float('-inf'))
        out.append(zy - others.logsumexp(1))
    return torch.cat(out)


@torch.no_grad()
def example_losses(model, x, y, batch=1000):
    model.eval()
    return torch.cat([F.cross_entropy(model(x[s:s + batch]).float(), y[s:s + batch], reduction='none')
                      for s in range(0, len(y), batch)])


def gradient_alignment(state, deltas, x, y, make=CNN, chunk=256):
    """(len(deltas), n): cos(delta, -(g_i - g_mean)) with g_i = grad_w loss(w; x_i, y_i) at the sent weights
    w = `state` (eval mode) and g_mean the candidates' mean gradient. Centring removes the direction every
    example's gradient shares early in training, which a cosine with the raw gradients mostly measures."""
    model = make().to(x.device)
    model.load_state_dict(state)
    model.eval()
    params = {k: v.detach().float() for k, v in model.named_parameters()}
    names = list(params)
    d = F.normalize(torch.stack([torch.cat([dl[k].to(x.device).float().flatten() for k in names]) for dl in deltas]),
                    dim=1)

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    # the mean of the per-example gradients is the gradient of the mean loss: one ordinary backward pass
    mean = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(model(x), y),
                                                               [dict(model.named_parameters())[k] for k in names])])
    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    for s in range(0, len(y), chunk):
        g = per_example(params, x[s:s + chunk], y[s:s + chunk])
        g = torch.cat([g[k].flatten(1) for k in names], 1) - mean
        out.append(-(F.normalize(g, dim=1) @ d.T))
    return torch.cat(out).T


@torch.no_grad()
def loss_reduction(state, deltas, x, y, make=CNN):
    """(len(deltas), n): loss(w; x_i, y_i) - loss(w + delta; x_i, y_i), how much each update lowered each
    candidate's loss from the sent weights w = `state`: the sent model is the per-example reference that
    calibrates for how hard an image is (difficulty calibration, Watson et al., ICLR 2022)."""
    model = make().to(x.device)
    model.load_state_dict(state)
    before = example_losses(model, x, y)
    rows = []
    for delta in deltas:
        model.load_state_dict({k: state[k].to(x.device).float() + delta[k].to(x.device).float() for k in state})
        rows.append(before - example_losses(model, x, y))
    return torch.stack(rows)


# the white-box tests on a client's update; the first is the headline (chosen on seed 1, reported on seed 0)
UPDATE_TESTS = {'loss_reduction': loss_reduction, 'gradient_alignment': gradient_alignment}


def attacked_rounds(captured, spec):
    """The honest recorded rounds (not a malicious server's crafted ones) that --mia-rounds names, in order."""
    rounds = [rd for rd in (captured or {}).get('rounds', []) if 'crafted' not in rd]
    if not rounds:
        return []
    spec = spec.replace(' ', '')
    if spec == 'all':
        return rounds
    if spec == 'first,last':
        return [rounds[0]] if len(rounds) == 1 else [rounds[0], rounds[-1]]
    by_number = {rd['round']: rd for rd in rounds}
    wanted = [int(p) for p in spec.split(',')]
    missing = [r for r in wanted if r not in by_number]
    if missing:
        raise UserError(f'--mia-rounds: rounds {missing} were not recorded (recorded: {sorted(by_number)})')
    return [by_number[r] for r in wanted]


# ---- the game's statistics ----

def roc(scores, member):
    """(fpr, tpr) at every threshold, highest scores first (predict member when score >= threshold)."""
    scores, member = np.asarray(scores, np.float64), np.asarray(member, bool)
    order = np.argsort(-scores, kind='stable')
    s, m = scores[order], member[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last position of each run of tied scores
    tp, fp = np.cumsum(m)[last], np.cumsum(~m)[last]
    return np.r_[0, fp / max(1, (~m).sum())], np.r_[0, tp / max(1, m.sum())]


def auc(scores, member):
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    member = np.asarray(member, bool)
    ranks = stats.rankdata(scores)
    p, n = member.sum(), (~member).sum()
    return float((ranks[member].sum() - p * (p + 1) / 2) / (p * n)) if p and n else None


def tpr_at(fpr, tpr, target):
    """The highest TPR at an FPR of at most `target` (LiRA's convention)."""
    return float(tpr[fpr <= target].max())


def clopper_pearson(k, n, confidence=CONFIDENCE):
    """(lower, upper) two-sided interval for a binomial rate k/n."""
    a = (1 - confidence) / 2
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    lo = np.where(k > 0, stats.beta.ppf(a, np.maximum(k, 1e-9), n - k + 1), 0.0)
    hi = np.where(k < n, stats.beta.ppf(1 - a, k + 1, np.maximum(n - k, 1e-9)), 1.0)
    return lo, hi


def epsilon_bound(tp, fp, p, n, delta):
    """The epsilon lower bound at each threshold with counts (tp, fp) of p members and n non-members: the larger of
    ln((TPR_lo - delta) / FPR_hi) and ln((TNR_lo - delta) / FNR_hi), never below 0."""
    tpr_lo, tpr_hi = clopper_pearson(tp, p)
    fpr_lo, fpr_hi = clopper_pearson(fp, n)
    with np.errstate(divide='ignore', invalid='ignore'):
        a = np.log(np.maximum(tpr_lo - delta, 0) / fpr_hi)
        b = np.log(np.maximum(1 - fpr_hi - delta, 0) / (1 - tpr_lo))
    return np.nan_to_num(np.maximum(np.maximum(a, b), 0.0), nan=0.0, neginf=0.0)


def empirical_epsilon(scores, member, delta, seed):
    """Threshold chosen on a random half of the candidates, epsilon's lower bound measured on the other half."""
    scores, member = np.asarray(scores, np.float64), np.asarray(member, bool)
    half = np.random.default_rng(derive_seed(seed, 'epsilon-split')).permutation(len(scores)) < len(scores) // 2

    def counts(s, m, thresholds):
        return ((s[None] >= thresholds[:, None]) & m[None]).sum(1), ((s[None] >= thresholds[:, None]) & ~m[None]).sum(1)

    pick, test = (scores[half], member[half]), (scores[~half], member[~half])
    thresholds = np.unique(pick[0])
    tp, fp = counts(*pick, thresholds)
    best = thresholds[np.argmax(epsilon_bound(tp, fp, pick[1].sum(), (~pick[1]).sum(), delta))]
    tp, fp = counts(*test, np.array([best]))
    return float(epsilon_bound(tp, fp, test[1].sum(), (~test[1]).sum(), delta)[0])


def game(scores, member, delta, seed):
    """The metrics of one membership game, and its ROC curve (for the figure)."""
    scores, member = np.asarray(scores, np.float64), np.asarray(member, bool)
    fpr, tpr = roc(scores, member)
    metrics = {'auc': auc(scores, member), **{k: tpr_at(fpr, tpr, f) for k, f in FPRS.items()},
               'empirical_epsilon': empirical_epsilon(scores, member, delta, seed),
               'members': int(member.sum()), 'non_members': int((~member).sum())}
    return metrics, (fpr, tpr)


class MembershipInference(Attack):
    name = 'membership'
    key = 'membership_inference'
    title = 'Membership inference (LiRA and loss threshold on the final model; loss reduction and gradient alignment on updates)'
    figures = ('membership_inference.png',)
    headline = (('final_model.lira.auc', 'final model: LiRA AUC', 'fraction'),
                ('final_model.lira.tpr_at_0_1pct_fpr', 'final model: LiRA TPR at 0.1 % FPR', 'fraction'),
                ('final_model.loss_threshold.auc', 'final model: loss-threshold AUC', 'fraction'),
                ('final_model.no_attack_baseline.lira.auc', 'no attack: reference model, LiRA AUC', 'fraction'),
                ('client_update.headline.auc', "a client's update: loss-reduction AUC", 'fraction'),
                ('client_update.headline.no_attack_baseline.auc', 'no attack: reference update AUC', 'fraction'),
                ('final_model.lira.empirical_epsilon', 'empirical epsilon lower bound (final model, LiRA)', 'number'))

    def add_arguments(self, parser):
        add_arguments(parser)

    def check(self, settings):
        check_args(settings)

    def observe(self, private, view, settings):
        """The challenger: m members drawn from all clients' images, m non-members withheld from the public split."""
        rng = np.random.default_rng(derive_seed(settings.seed, 'membership-candidates'))
        owner = np.concatenate([np.full(len(p), c) for c, p in enumerate(private.client_indices)])
        index = np.concatenate(private.client_indices)
        m = min(settings.mia_candidates, len(view.public_y) // 2, len(index))
        withheld = rng.permutation(len(view.public_y))[:m]
        pick = rng.choice(len(index), m, replace=False)
        device = private.train_x.device
        x = torch.cat([private.train_x[torch.as_tensor(index[pick], device=device)],
                       view.public_x[torch.as_tensor(withheld, device=view.public_x.device)].to(device)])
        y = torch.cat([private.train_y[torch.as_tensor(index[pick], device=device)],
                       view.public_y[torch.as_tensor(withheld, device=view.public_y.device)].to(device)])
        shuffle = rng.permutation(2 * m)
        member = shuffle < m
        client = np.where(member, owner[pick][np.minimum(shuffle, m - 1)], -1)
        order = torch.as_tensor(shuffle, device=device)
        return Observation(sent={'x': x[order], 'y': y[order]}, truth={'member': member, 'client': client},
                           public_withheld=withheld)

    def run(self, view, settings):
        """Scores per candidate (higher = member) from the final model, the recorded updates and public data."""
        check_args(settings)
        x, y = view.observed['x'].to(view.device), view.observed['y'].to(view.device)
        rounds = attacked_rounds(view.captured, settings.mia_rounds)  # a round not recorded fails before any work
        started = time.perf_counter()
        recipe = training_recipe(view.config)
        half = len(view.public_y) // 2
        # S shadows for LiRA and one reference model, all on the server's remaining public data

        def make():  # the target's architecture, for the dataset's images
            return create_model(view.config.get('model', 'cnn'), view.spec)

        states = train_models(view.public_x, view.public_y, settings.mia_shadows + 1, half, recipe, settings.seed,
                              view.device, make=make)
        shadow = make().to(view.device)
        phi = []
        for state in states:
            shadow.load_state_dict(state)
            phi.append(logit_confidence(shadow, x, y))
        phi_shadow, phi_reference = torch.stack(phi[:-1]), phi[-1]
        reference_loss = example_losses(shadow, x, y)  # `shadow` holds the reference model's weights now
        mu = phi_shadow.mean(0)
        sigma = (phi_shadow - mu).std().clamp_min(1e-6)
        out = {'lira': (logit_confidence(view.model, x, y) - mu) / sigma, 'loss': -example_losses(view.model, x, y),
               'lira_reference': (phi_reference - mu) / sigma, 'loss_reference': -reference_loss,
               'shadow_seconds': time.perf_counter() - started, 'rounds': []}
        for rd in rounds:
            sent = rd.get('updates') or [{'client': None, **rd['aggregate']}]
            # the reference update: a client's local training from the same sent weights, on public data only
            # (as many images as a client holds, or the aggregate's total, up to half the public data)
            n_client = int(np.median([u['num_samples'] for u in sent]))
            reference = train_models(view.public_x, view.public_y, 1, min(half, max(1, n_client)),
                                     (view.config['local_epochs'],) + recipe[1:], derive_seed(settings.seed, rd['round']),
                                     view.device, global_state={k: v.to(view.device) for k, v in rd['global_state'].items()},
                                     make=make)[0]
            ref_delta = {k: reference[k].float().cpu() - rd['global_state'][k].float() for k in reference}
            deltas = [u['delta'] for u in sent] + [ref_delta]  # the reference update last
            out['rounds'].append({'round': rd['round'], 'clients': [u['client'] for u in sent],
                                  'scores': {name: test(rd['global_state'], deltas, x, y, make)
                                             for name, test in UPDATE_TESTS.items()}})
        out['seconds'] = time.perf_counter() - started
        return out

    def score(self, result, private, truth, view, settings, out_dir):
        member, client = truth['member'], truth['client']
        delta = view.config['dp_delta']
        seed = settings.seed
        curves = {}

        def play(name, scores, is_member):
            metrics, curves[name] = game(scores.cpu().numpy(), is_member, delta, seed)
            return metrics

        final = {'lira': play('LiRA (final model)', result['lira'], member),
                 'loss_threshold': play('loss threshold (final model)', result['loss'], member),
                 'no_attack_baseline': {
                     'lira': play('LiRA, reference model (no attack)', result['lira_reference'], member),
                     'loss_threshold': game(result['loss_reference'].cpu().numpy(), member, delta, seed)[0],
                     'protocol': 'the same scores against a reference model trained like a shadow on the '
                                 "server's public data only: it saw no candidate"}}
        headline_test = next(iter(UPDATE_TESTS))
        rounds = []
        for rd in result['rounds']:
            tests = {}
            for name, scores in rd['scores'].items():
                tests[name], curve = self._score_round(rd['round'], rd['clients'], scores, member, client, delta, seed)
                if rd is result['rounds'][-1]:
                    curves[f"{name.replace('_', ' ')} (round {rd['round']} update)"] = curve
            rounds.append({'round': rd['round'], **tests})
        if rounds:
            update = {'test': headline_test, 'headline': dict(rounds[-1][headline_test], round=rounds[-1]['round']),
                      'rounds': rounds}
        else:
            update = {'headline': {'auc': None, 'no_attack_baseline': {'auc': None}}, 'rounds': [],
                      'unavailable': 'the server recorded no honest round (captured_updates.pt absent or empty)'}
        accountant = view.training.get('privacy', {}).get('dp_sgd', {}).get('epsilon')
        lira, h = final['lira'], update['headline']
        metrics = {
            'summary': (f"final model: LiRA AUC {lira['auc']:.3f}, TPR {lira['tpr_at_0_1pct_fpr']:.1%} at 0.1 % FPR "
                        f"(reference model, no attack: AUC {final['no_attack_baseline']['lira']['auc']:.3f}); loss "
                        f"threshold AUC {final['loss_threshold']['auc']:.3f}; "
                        + (f"round {h['round']} update: AUC {h['auc']:.3f} (reference update "
                           f"{h['no_attack_baseline']['auc']:.3f}); " if 'round' in h else 'no client update recorded; ')
                        + f"empirical epsilon >= {lira['empirical_epsilon']:.2f}"
                        + (f" (accountant: {accountant:.2f})" if accountant is not None else '')),
            'seed': seed,
            'final_model': final,
            'client_update': update,
            'accountant_epsilon': accountant,
            'delta': delta,
            'shadow_models': settings.mia_shadows,
            'shadow_seconds': result['shadow_seconds'],
            'attack_seconds': result['seconds'],
            'threat_model': {
                'attacker': 'honest-but-curious server',
                'knows': 'the final global model (black box: logits), the announced training protocol, its own '
                         'record of client updates and the weights it sent (white box), its public data less the '
                         'withheld non-members, and the candidates\' images and labels',
                'does_not_know': 'which candidates are members',
                'variant': 'LiRA offline (shadows never train on a candidate), fixed variance; shadows and '
                           "reference train with the protocol's plain (non-DP) settings",
                'game': f"{lira['members']} members drawn from all clients' training images, as many non-members "
                        'withheld from the public test split; threshold for the epsilon bound chosen on one half, '
                        f'bound measured on the other, Clopper-Pearson {CONFIDENCE:.0%}',
                'scoring_only': 'which candidates are members and whose',
            },
        }
        save_roc_curves(os.path.join(out_dir, 'membership_inference.png'), curves,
                        'Membership inference (log-log ROC)')
        arrays = {'member': member, 'client': client.astype(np.int64),
                  'lira': result['lira'].cpu().numpy(), 'loss': result['loss'].cpu().numpy()}
        return Report(metrics, arrays)

    @staticmethod
    def _score_round(round_num, clients, scores, member, client, delta, seed):
        """One recorded round under one test, scores (clients + 1 reference, n): the pooled game (each member scored
        by its own client's update, each non-member by one client drawn at random, so every candidate counts once),
        each client's members against all non-members, and the reference update's game. (metrics, pooled ROC)."""
        scores, reference = scores[:-1].cpu().numpy(), scores[-1].cpu().numpy()
        nonmember = client < 0
        if clients == [None]:  # a secure aggregate: membership in any client's data
            pooled, keep, per_client = scores[0], np.ones(len(client), bool), {}
        else:
            row = {c: i for i, c in enumerate(clients)}
            rng = np.random.default_rng(derive_seed(seed, 'membership-pool', round_num))
            pick = np.where(nonmember, rng.integers(0, len(row), len(client)), [row.get(c, -1) for c in client])
            keep = pick >= 0  # members of a client that sent nothing this round take no part
            pooled = scores[np.maximum(pick, 0), np.arange(len(client))]
            per_client = {str(c): auc(np.r_[scores[i][client == c], scores[i][nonmember]],
                                      np.r_[np.ones((client == c).sum(), bool), np.zeros(nonmember.sum(), bool)])
                          for c, i in row.items() if (client == c).any()}
        metrics, curve = game(pooled[keep], member[keep], delta, seed)
        return {**metrics, 'auc_per_client': per_client, 'no_attack_baseline': game(reference, member, delta, seed)[0]}, curve
