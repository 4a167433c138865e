"""Experiment settings: plain values, then a preset, then command-line flags.

Edit the values below to change the defaults (for example switch
'data_distribution' between 'iid' and 'non_iid'); every one of them also has a
flag in main.py, which wins over this file. Presets override only the values
they name.
"""

CONFIG = {
    # data
    'dataset': 'mnist',             # 'mnist' | 'fashion-mnist' | 'cifar10' (binary version) | 'idx' (any IDX folder)
    'data_dir': None,               # its folder; None = data/<dataset> (MNIST, Fashion-MNIST downloaded if missing)
    'model': 'cnn',                 # 'cnn' | 'mlp' | 'lenet' (src/model.py), built for the dataset's images
    'data_distribution': 'iid',     # 'iid' | 'non_iid' (2 classes per client) | 'shards' | 'dirichlet'
    'dirichlet_alpha': 0.5,         # concentration for 'dirichlet' (smaller = more skewed)
    # federated training
    'num_clients': 5,
    'num_rounds': 10,
    'local_epochs': 5,
    'batch_size': 64,
    'learning_rate': 0.01,          # plain SGD, no momentum
    'seed': 0,
    'device': 'auto',               # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
    'precision': 'auto',            # 'auto' (bf16 where the hardware has it) | 'bf16' | 'fp32'
    'trainer': 'auto',              # 'auto' (batched on CUDA, else sequential) | 'sequential' | 'batched'
    # defenses (all off by default; they compose)
    'dp_epsilon': 0.0,              # DP-SGD (Opacus) on every client at this record-level epsilon (at dp_delta) for
                                    # the whole run: the noise multiplier is computed for it; 0 = off (or dp_noise_multiplier)
    'dp_noise_multiplier': 0.0,     # DP-SGD with this noise std / clipping bound instead of a target epsilon; 0 = off
    'dp_max_grad_norm': 1.0,        # DP-SGD per-sample clipping bound
    'dp_delta': 1e-5,               # delta at which epsilon is reported
    # what a client trains with under DP-SGD instead of local_epochs / batch_size / learning_rate: clipped,
    # noised gradients need larger batches and steps (tuned on seeds 1 and 2: README, "DP-SGD that learns")
    'dp_local_epochs': 2,
    'dp_batch_size': 256,
    'dp_learning_rate': 2.0,
    'dp_dropout': 0.0,              # the model's dropout under DP-SGD: its masks only add noise to clipped gradients
    'update_clip': 0.0,             # clip each client's update to this L2 norm; 0 = off
    'update_noise': 0.0,            # Gaussian noise on the clipped update, std = update_noise * update_clip
    'keep_fraction': 1.0,           # prune each update tensor to this top fraction by magnitude; 1 = off
    'secure_aggregation': False,    # the server learns only the round's aggregate (weighted mean) update
    # a malicious server (src/malicious.py): on malicious_rounds it sends a crafted model, records the
    # updates and does not aggregate them; clients may check what they receive (client_verify)
    'server': 'honest',             # 'honest' | 'malicious'
    'malicious_attack': 'imprint',  # 'imprint' (extra block) | 'loki' (per-client bins) | 'fc1' (agreed architecture)
    'malicious_rounds': '1',        # round numbers '3,7' on which the malicious server crafts the model
    'malicious_bins': 16000,        # imprint: units of the crafted block; loki: units per client (block: x clients)
    'client_verify': False,         # clients refuse a model that is not the agreed architecture or looks crafted
    # what the honest-but-curious server keeps: 'all', 'none', or round numbers '1,5,10'
    'capture_rounds': 'all',
    'output_dir': '.',
    # 'builtin' (one process, fastest here) | 'flower' (Flower's simulation engine; pip install -r requirements-flower.txt)
    'engine': 'builtin',
}

PRESETS = {
    'quick': {'num_clients': 3, 'num_rounds': 3, 'local_epochs': 2},
    'standard': {'num_clients': 5, 'num_rounds': 10, 'local_epochs': 5},
    # 200 captured updates of 0.9 MB each would be 180 MB: keep every 5th round
    'extensive': {'num_clients': 10, 'num_rounds': 20, 'local_epochs': 10,
                  'capture_rounds': '1,5,10,15,20'},
}


def resolve(preset=None, overrides=None):
    """CONFIG, then the preset's values, then the non-None overrides (flags)."""
    cfg = dict(CONFIG)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        cfg.update(PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in cfg:
            raise ValueError(f'unknown setting {key!r}')
        if value is not None:
            cfg[key] = value
    return cfg
