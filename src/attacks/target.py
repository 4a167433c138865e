"""Load what an attack run needs from the files main.py wrote, split by who may see it: the server's
view (global model, announced protocol, its record of updates, public data) and the clients' data."""
import os

import numpy as np
import torch

from src.attacks.base import AttackerView, PrivateData
from src.data import MNIST_SPEC, load_dataset, to_tensor
from src.model import create_model, param_shapes
from src.records import load_captured, load_history
from src.utils import UserError, load_torch, resolve_device


def load_model(path, name='cnn', spec=MNIST_SPEC, device='cpu'):
    """Model `name` built for `spec`, from a weights_only state dict; refuse other architectures with the
    mismatch named."""
    state = load_torch(path, 'model checkpoint')
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'model checkpoint {path}: not a state dict of tensors')
    meta = getattr(state, '_metadata', None)
    root = meta.get('') if isinstance(meta, dict) else None
    recorded = root.get('model') if isinstance(root, dict) else None  # a malformed entry names nothing
    if recorded is not None and recorded != name:
        raise UserError(f'model checkpoint {path} holds a {recorded}, but its training history names the {name}')
    model = create_model(name, spec)
    expected, got = param_shapes(model), {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        detail = '; '.join(s for s in (
            f'missing {missing}' if missing else '', f'unexpected {extra}' if extra else '',
            ', '.join(f'{k} is {got[k]} not {expected[k]}' for k in wrong)) if s)
        raise UserError(f'model checkpoint {path} is not the {name} its training history names, built for '
                        f'{spec.shape[1]}x{spec.shape[2]} images of {spec.channels} channel(s): {detail}')
    model.load_state_dict(state)
    return model.to(device).eval()


# what the server announced or learnt itself; 'partition' and the per-client class counts are the
# clients' private data and stay out of the attacker's view
PRIVATE_HISTORY_KEYS = ('partition', 'clients', 'classes_held_by_no_client')


def load_attack_inputs(model_path='global_model.pth', history_path=None, data_dir=None, device='auto',
                       cache_dir='cache'):
    """(AttackerView, PrivateData) from the files main.py wrote; every file is checked here, once.

    The history defaults to training_history.json beside the model, the recorded updates to
    captured_updates.pt beside it (None when the server kept none).
    """
    device = resolve_device(device)
    folder = os.path.dirname(os.path.abspath(model_path))
    history_path = history_path or os.path.join(folder, 'training_history.json')
    history = load_history(history_path)
    cfg = history['config']
    data = load_dataset(cfg['dataset'], data_dir or cfg['data_dir'])
    model = load_model(model_path, cfg.get('model', 'cnn'), data.spec, device)
    captured_path = os.path.join(folder, 'captured_updates.pt')
    captured = load_captured(captured_path, param_shapes(model)) if os.path.exists(captured_path) else None
    indices = [np.asarray(p, dtype=np.int64) for p in history['partition']['indices']]
    if sum(len(p) for p in indices) and max(int(p.max()) for p in indices if len(p)) >= len(data.train_labels):
        raise UserError(f'training history {history_path}: partition.indices reach beyond the '
                        f'{len(data.train_labels)} training images in {data_dir or cfg["data_dir"]} (other data?)')
    view = AttackerView(
        model=model, training={k: v for k, v in history.items() if k not in PRIVATE_HISTORY_KEYS},
        captured=captured, public_x=to_tensor(data.test_images, device),
        public_y=torch.from_numpy(data.test_labels.astype(np.int64)).to(device),
        dataset=data.name, spec=data.spec, device=device, cache_dir=cache_dir)
    private = PrivateData(train_x=to_tensor(data.train_images, device),
                          train_y=torch.from_numpy(data.train_labels.astype(np.int64)).to(device),
                          client_indices=indices, dataset=data)
    return view, private
