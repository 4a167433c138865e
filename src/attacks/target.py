"""What the attacking server holds after training: the global model, the training record,
the captured client updates, and (for scoring only) the data the clients trained on."""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from src.data import Dataset, load_dataset, to_tensor
from src.model import CNN, param_shapes
from src.records import load_captured, load_history
from src.utils import UserError, load_torch, resolve_device


@dataclass
class Target:
    model: CNN                 # the attacked global model, fp32, eval mode, on `device`
    history: dict              # training_history.json
    data: Dataset              # uint8 arrays; clients' private data = train split
    train_x: torch.Tensor      # (N, 1, 28, 28) float in [0, 1], on device
    train_y: torch.Tensor      # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    client_indices: list       # one int64 array of train indices per client
    captured_path: str         # captured_updates.pt beside the model
    device: torch.device
    captured: dict = None      # captured_updates.pt's content, checked at load time (None: no such file)

    @property
    def config(self):
        return self.history['config']


def load_model(path, device='cpu'):
    """A CNN from a weights_only state dict; refuse other architectures with the mismatch named."""
    state = load_torch(path, 'model checkpoint')
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'model checkpoint {path}: not a state dict of tensors')
    model = CNN()
    expected, got = param_shapes(model), {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        detail = '; '.join(s for s in (
            f'missing {missing}' if missing else '', f'unexpected {extra}' if extra else '',
            ', '.join(f'{k} is {got[k]} not {expected[k]}' for k in wrong)) if s)
        raise UserError(f'model checkpoint {path} is not this CNN: {detail}')
    model.load_state_dict(state)
    return model.to(device).eval()


def load_target(model_path='global_model.pth', history_path=None, data_dir=None, device='auto'):
    """Everything an attack needs, from the files main.py wrote (history defaults to the model's folder)."""
    device = resolve_device(device)
    folder = os.path.dirname(os.path.abspath(model_path))
    history = load_history(history_path or os.path.join(folder, 'training_history.json'))
    model = load_model(model_path, device)
    captured_path = os.path.join(folder, 'captured_updates.pt')
    cfg = history['config']
    data = load_dataset(cfg['dataset'], data_dir or cfg['data_dir'])
    indices = [np.asarray(p, dtype=np.int64) for p in history['partition']['indices']]
    if sum(len(p) for p in indices) and max(int(p.max()) for p in indices if len(p)) >= len(data.train_labels):
        raise UserError(f'training history {history_path or folder}: partition.indices reach beyond the '
                        f'{len(data.train_labels)} training images in {data_dir or cfg["data_dir"]} (other data?)')
    return Target(
        model=model, history=history, data=data,
        train_x=to_tensor(data.train_images, device),
        train_y=torch.from_numpy(data.train_labels.astype(np.int64)).to(device),
        test_x=to_tensor(data.test_images, device),
        test_y=torch.from_numpy(data.test_labels.astype(np.int64)).to(device),
        client_indices=indices,
        captured_path=captured_path,
        captured=load_captured_updates(captured_path) if os.path.exists(captured_path) else None,
        device=device,
    )


def load_captured_updates(path):
    """captured_updates.pt as main.py wrote it, checked against the CNN's parameter shapes."""
    return load_captured(path, param_shapes(CNN()))
