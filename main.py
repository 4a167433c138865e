"""Federated training with an honest-but-curious server.

    python main.py --config quick|standard|extensive [flags]

Writes global_model.pth, training_history.json and captured_updates.pt to --output-dir.
"""
import argparse
import sys

import config
from src.data import DATASETS
from src.model import MODELS
from src.utils import UserError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', choices=sorted(config.PRESETS), default=None,
                   help='preset (quick: 3 clients/3 rounds/2 epochs; standard: 5/10/5; extensive: 10/20/10); '
                        'default: the values in config.py')
    p.add_argument('--dataset', choices=list(DATASETS),
                   help='mnist, fashion-mnist (IDX, downloaded if missing), cifar10 (its binary version, from '
                        '--data-dir) or idx (any IDX folder: EMNIST, KMNIST, ...; --data-dir)')
    p.add_argument('--data-dir',
                   help='the dataset\'s folder (default data/<dataset>; MNIST is downloaded there if missing)')
    p.add_argument('--model', choices=list(MODELS), help='the target model (default cnn): cnn, mlp or lenet')
    p.add_argument('--distribution', dest='data_distribution', choices=['iid', 'non_iid', 'shards', 'dirichlet'])
    p.add_argument('--alpha', dest='dirichlet_alpha', type=float, help='Dirichlet concentration (dirichlet only)')
    p.add_argument('--clients', dest='num_clients', type=int)
    p.add_argument('--rounds', dest='num_rounds', type=int)
    p.add_argument('--local-epochs', type=int)
    p.add_argument('--batch-size', type=int)
    p.add_argument('--lr', dest='learning_rate', type=float)
    p.add_argument('--seed', type=int)
    p.add_argument('--device', help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--precision', choices=['auto', 'bf16', 'fp32'],
                   help='bf16 autocast for local training (auto: where the hardware supports it)')
    p.add_argument('--trainer', choices=['auto', 'sequential', 'batched'],
                   help="'batched': all clients of a round as one computation (a CUDA graph on GPUs); "
                        "'sequential': one client after another; auto: batched on CUDA (DP-SGD: always sequential)")
    p.add_argument('--capture-rounds', help="rounds whose client updates the server keeps: 'all', 'none', '1,5,10'")
    p.add_argument('--dp-epsilon', type=float,
                   help='DP-SGD on every client (Opacus) at this record-level epsilon for the whole run (the noise '
                        'multiplier is computed for it); 0 = off')
    p.add_argument('--dp-noise', dest='dp_noise_multiplier', type=float,
                   help='DP-SGD with this noise multiplier instead of a target epsilon; 0 = off')
    p.add_argument('--dp-clip', dest='dp_max_grad_norm', type=float, help='DP-SGD per-sample clipping bound')
    p.add_argument('--dp-delta', type=float, help='delta at which epsilon is reported')
    p.add_argument('--dp-local-epochs', type=int, help='local epochs under DP-SGD (instead of --local-epochs)')
    p.add_argument('--dp-batch-size', type=int, help='expected batch size under DP-SGD (Poisson sampling)')
    p.add_argument('--dp-lr', dest='dp_learning_rate', type=float, help='client learning rate under DP-SGD')
    p.add_argument('--dp-dropout', type=float, help="the model's dropout probability under DP-SGD")
    p.add_argument('--update-clip', type=float, help="clip each client's update to this L2 norm; 0 = off")
    p.add_argument('--update-noise', type=float, help='Gaussian noise on the clipped update, in units of --update-clip')
    p.add_argument('--keep-fraction', type=float, help='prune each update to this top fraction by magnitude')
    p.add_argument('--secure-aggregation', action='store_const', const=True,
                   help="the server learns only each round's aggregate (sample-weighted mean) update")
    p.add_argument('--server', choices=['honest', 'malicious'],
                   help="'malicious': on --malicious-rounds the server sends a crafted model (src/malicious.py)")
    p.add_argument('--malicious-attack', choices=['imprint', 'loki', 'fc1'],
                   help="the crafted model: 'imprint' (Robbing the Fed: an extra block of bins), 'loki' (its bins "
                        "split among the clients, one share each), 'fc1' (trap rows on fc1: the agreed architecture)")
    p.add_argument('--malicious-rounds', help="rounds on which the malicious server crafts the model, e.g. '3,7'")
    p.add_argument('--malicious-bins', type=int,
                   help="bins of the crafted block ('imprint'), or of each client's share of it ('loki')")
    p.add_argument('--client-verify', action='store_const', const=True,
                   help='clients refuse a received model that is not the agreed architecture or looks crafted')
    p.add_argument('--output-dir')
    p.add_argument('--engine', choices=['builtin', 'flower'],
                   help="'builtin' (default) or 'flower': the same experiment on Flower's simulation engine "
                        '(needs pip install -r requirements-flower.txt)')
    p.add_argument('--resume', action='store_true',
                   help='continue a killed run from the checkpoint.pt in --output-dir (same settings)')
    args = vars(p.parse_args(argv))
    preset, resume = args.pop('config'), args.pop('resume')
    return config.resolve(preset, args), resume


def main(argv=None):
    cfg, resume = parse_args(argv)
    try:
        if cfg['engine'] == 'flower':
            if resume:
                raise UserError('--resume works with the built-in engine only (drop --resume or --engine flower)')
            try:  # Flower is optional: import it only when asked for
                from src.flower_engine import train_flower
            except ImportError as e:
                raise UserError(f'--engine flower needs Flower: pip install -r requirements-flower.txt ({e})') from None
            train_flower(cfg)
        else:
            from src.federated import train  # import torch only after --help has been answered
            train(cfg, resume=resume)
    except UserError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
