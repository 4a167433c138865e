"""The server: federated averaging, evaluation, and the honest-but-curious record of every update."""
import torch
import torch.nn.functional as F


def fedavg(states, num_samples):
    """Sample-weighted mean of client state dicts (McMahan et al. 2017)."""
    total = float(sum(num_samples))
    weights = [n / total for n in num_samples]
    return {key: sum(w * s[key].float() for w, s in zip(weights, states)).to(states[0][key].dtype)
            for key in states[0]}


@torch.no_grad()
def evaluate(model, images, labels, batch_size=1000):
    """(mean cross-entropy, accuracy) of `model` on a labelled set, in eval mode and fp32."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size]).float()
        y = labels[start:start + batch_size]
        loss += F.cross_entropy(logits, y, reduction='sum').item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(labels), correct / len(labels)


def parse_capture_rounds(spec, num_rounds):
    """'all' | 'none' | '1,5,10' -> the set of rounds (1-based) whose updates the server keeps."""
    spec = str(spec).strip().lower()
    if spec == 'all':
        return set(range(1, num_rounds + 1))
    if spec in ('none', ''):
        return set()
    try:
        rounds = {int(r) for r in spec.split(',')}
    except ValueError:
        raise ValueError(f"capture_rounds {spec!r}: use 'all', 'none' or round numbers like '1,5,10'") from None
    bad = sorted(r for r in rounds if not 1 <= r <= num_rounds)
    if bad:
        raise ValueError(f'capture_rounds {bad} outside 1..{num_rounds}')
    return rounds


def compact(t):
    """t row-sparse where under a quarter of its rows are non-zero (a 'loki' client's update of the crafted
    block: 1/clients of the rows; load_captured makes it dense again), else t."""
    if t.dim() < 1 or t.shape[0] < 64:
        return t
    rows = t.reshape(t.shape[0], -1).ne(0).any(1).sum()
    return t.to_sparse(sparse_dim=1) if rows < t.shape[0] // 4 else t


class CuriousServer:
    """FedAvg server that also keeps what it legitimately receives.

    For each kept round it stores the global weights it sent out and, per client, the
    update (new weights minus global) with what the server knows of it: client id, round,
    sample count and the training hyper-parameters the protocol announces.

    With secure aggregation (simulated) the server learns only the round's aggregate: clients
    scale their updates by their sample counts, the protocol reveals the sum of those and of the
    counts, and the server divides, so it holds the sample-weighted MEAN update (what FedAvg needs)
    and the total sample count and no individual update: record['rounds'][i]['aggregate'] instead
    of ['updates'].
    """

    def __init__(self, capture_rounds, training_meta, secure_aggregation=False):
        self.capture_rounds = capture_rounds
        self.meta = dict(training_meta, secure_aggregation=secure_aggregation)
        self.secure_aggregation = secure_aggregation
        self.rounds = []  # [{'round', 'global_state', 'updates': [...]}]

    def aggregate(self, round_num, global_state, client_ids, states, num_samples):
        new_state = fedavg(states, num_samples)
        if round_num in self.capture_rounds and self.secure_aggregation:
            self.rounds.append({
                'round': round_num,
                'global_state': {k: v.detach().cpu().clone() for k, v in global_state.items()},
                'aggregate': {'num_clients': len(states), 'num_samples': int(sum(num_samples)),
                              'delta': {k: (new_state[k] - global_state[k]).cpu() for k in new_state}},
            })
        elif round_num in self.capture_rounds:
            self.rounds.append({
                'round': round_num,
                'global_state': {k: v.detach().cpu().clone() for k, v in global_state.items()},
                'updates': [{'client': cid, 'num_samples': n,
                             'delta': {k: (s[k] - global_state[k]).cpu() for k in s}}
                            for cid, s, n in zip(client_ids, states, num_samples)],
            })
        return new_state

    def record_crafted(self, round_num, crafted_state, sent, crafting, client_ids, states, num_samples):
        """A malicious server's crafted round (src.malicious), kept whatever capture_rounds says and never
        aggregated. 'global_state' is the crafted model; 'crafted' holds the crafting parameters the
        read-out needs (for 'loki' also each client's live rows: what client c was sent is the crafted
        model with the other rows dead). Each update is relative to what that client was sent; under
        secure aggregation only their sample-weighted mean is kept, as on any round.
        """
        deltas = [{k: (s[k].detach().cpu() - sent[c][k].cpu()) for k in s} for c, s in zip(client_ids, states)]
        if not self.secure_aggregation:  # a 'loki' client's update moves only its share of the block's rows
            deltas = [{k: compact(v) for k, v in d.items()} for d in deltas]
        entry = {'round': round_num, 'crafted': crafting,
                 'global_state': {k: v.detach().cpu().clone() for k, v in crafted_state.items()}}
        if self.secure_aggregation:
            entry['aggregate'] = {'num_clients': len(deltas), 'num_samples': int(sum(num_samples)),
                                  'delta': fedavg(deltas, num_samples)}
        else:
            entry['updates'] = [{'client': cid, 'num_samples': n, 'delta': d}
                                for cid, n, d in zip(client_ids, num_samples, deltas)]
        self.rounds.append(entry)

    def record(self):
        """The weights_only-loadable content of captured_updates.pt."""
        return {'format': 1, 'meta': dict(self.meta), 'rounds': self.rounds}
