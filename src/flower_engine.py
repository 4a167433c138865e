"""The same experiment on Flower (Message API): a ServerApp whose strategy is the curious server, a ClientApp
that runs the built-in engine's local training.

    python main.py --config standard --engine flower     # Flower's simulation engine (Ray), one machine
    flwr run flower_app ...                               # a real deployment: see README (flower_app/fl_app.py
                                                          # resolves the run config and calls run_server)

Both sides reuse src.federated: the same data loading and partitioning (client c = node config
'partition-id' c), model initialisation, local training with defenses and (seed, round, client) seeds,
FedAvg and CuriousServer record, and the same files (global_model.pth, training_history.json,
captured_updates.pt). The experiment's settings travel to clients inside each round's ConfigRecord, as
the protocol's announced hyper-parameters; a SuperNode may override where its data lives with node
config 'data-dir'.
"""
import json
import logging
import os
import time

os.environ.setdefault('FLWR_TELEMETRY_ENABLED', '0')  # no network at run time: Flower would send usage events
os.environ.setdefault('RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO', '0')  # Ray's future default; silences its warning

import flwr  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src import federated as fed  # noqa: E402
from src.defenses import client_recipe, with_dp_noise  # noqa: E402
from src.model import create_model  # noqa: E402
from src.server import evaluate  # noqa: E402
from src.utils import check_output_dir, resolve_device, resolve_precision  # noqa: E402

DATA_KEYS = ('dataset', 'data_dir', 'num_clients', 'data_distribution', 'dirichlet_alpha', 'seed')


# ----------------------------------------------------------------------------- client

_client_cache = {}  # one client's tensors, kept across rounds (Ray actors and SuperNodes are long-lived)


def client_data(cfg, c, device):
    key = (json.dumps({k: cfg[k] for k in DATA_KEYS}, sort_keys=True), c, str(device))
    if key not in _client_cache:
        data, parts, _, _ = fed.load_partitions(cfg)
        _client_cache.clear()
        _client_cache[key] = (*fed.client_tensors(data, [parts[c]], device)[0], data.spec)
    return _client_cache[key]


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    cfg = json.loads(msg.content['config']['experiment'])
    if 'data-dir' in context.node_config:
        cfg['data_dir'] = str(context.node_config['data-dir'])
    c = int(context.node_config['partition-id'])
    r = int(msg.content['config']['server-round'])
    device = resolve_device(cfg['device'])
    precision = resolve_precision(cfg['precision'], device)
    x, y, spec = client_data(cfg, c, device)
    global_state = {k: v.to(device) for k, v in msg.content['arrays'].to_torch_state_dict().items()}
    model = create_model(cfg['model'], spec).to(device, memory_format=torch.channels_last)
    # this client's Opacus accountant history lives with the client, across rounds
    dp_history = json.loads(context.state['dp']['history']) if 'dp' in context.state else []
    state, n, dp_history = fed.local_update(cfg, model, global_state, x, y, r, c, precision, dp_history)
    context.state['dp'] = ConfigRecord({'history': json.dumps(dp_history)})
    return Message(RecordDict({
        'arrays': ArrayRecord.from_torch_state_dict(state),
        'metrics': MetricRecord({'num-examples': n, 'partition-id': c}),
        'privacy': ConfigRecord({'dp-history': json.dumps(dp_history)}),
    }), reply_to=msg)


# ----------------------------------------------------------------------------- server

class CuriousFedAvg(FedAvg):
    """Flower's FedAvg with src.server.CuriousServer doing the aggregation and the recording.

    Every client trains every round (as in the built-in engine) and replies are taken in
    partition-id order, so the weighted sum is computed in the same order, on the same values.
    """

    def __init__(self, cfg, server, global_state, model, test_x, test_y, log):
        n = cfg['num_clients']
        super().__init__(fraction_train=1.0, min_train_nodes=n, min_evaluate_nodes=0, min_available_nodes=n)
        self.cfg, self.server, self.log = cfg, server, log
        self.global_state = {k: v.detach().cpu().clone() for k, v in global_state.items()}
        self.model, self.test_x, self.test_y = model, test_x, test_y
        self.rounds, self.dp_history = [], [[] for _ in range(n)]
        self.bar = tqdm(total=cfg['num_rounds'], desc='rounds (flower)', unit='round')

    def configure_train(self, server_round, arrays, config, grid):
        self.round_started = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        valid, errors = self._check_and_log_replies(replies, is_train=True)
        if errors or len(valid) != self.cfg['num_clients']:
            reasons = '; '.join(m.error.reason.strip().splitlines()[-1] for m in errors) or 'replies missing'
            raise RuntimeError(f'round {server_round}: {len(valid)} of {self.cfg["num_clients"]} clients replied '
                               f'({reasons})')
        valid.sort(key=lambda m: int(m.content['metrics']['partition-id']))
        ids = [int(m.content['metrics']['partition-id']) for m in valid]
        if ids != list(range(self.cfg['num_clients'])):
            raise RuntimeError(f'round {server_round}: replies from partitions {ids}, expected each of '
                               f'0..{self.cfg["num_clients"] - 1} once (set node config partition-id)')
        states = [m.content['arrays'].to_torch_state_dict() for m in valid]
        sizes = [int(m.content['metrics']['num-examples']) for m in valid]
        for c, m in zip(ids, valid):
            self.dp_history[c] = json.loads(m.content['privacy']['dp-history'])
        self.global_state = self.server.aggregate(server_round, self.global_state, ids, states, sizes)
        return ArrayRecord.from_torch_state_dict(self.global_state), MetricRecord({'num-examples': sum(sizes)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # the server evaluates the global model itself (evaluate_global), as the built-in engine does

    def evaluate_global(self, server_round, arrays):
        """Central evaluation on the test set, as the built-in engine does after each round."""
        if server_round == 0:
            return None
        device = self.test_x.device
        self.model.load_state_dict({k: v.to(device) for k, v in arrays.to_torch_state_dict().items()})
        test_loss, test_acc = evaluate(self.model, self.test_x, self.test_y)
        self.rounds.append({'round': server_round, 'test_loss': test_loss, 'test_accuracy': test_acc,
                            'seconds': time.perf_counter() - self.round_started})
        self.bar.update(1)
        self.bar.set_postfix(test_acc=f'{test_acc:.4f}', loss=f'{test_loss:.4f}')
        self.log(f'round {server_round}: test accuracy {test_acc:.4f}, test loss {test_loss:.4f}')
        return MetricRecord({'test_loss': test_loss, 'test_accuracy': test_acc})


def run_server(grid: Grid, cfg, log=tqdm.write, loaded=None, started=None):
    """The ServerApp's work: set up as the built-in engine does, run the strategy, write the same files."""
    started = started or time.perf_counter()
    if loaded is None:  # called on its own: set up as train_flower does
        fed.validate(cfg)
        loaded = fed.load_partitions(cfg, log)
        fed.validate_model(cfg, loaded[0].spec)
        cfg = with_dp_noise(cfg, [len(p) for p in loaded[1]], log)
    check_output_dir(cfg['output_dir'], 'main.py')
    data, parts, counts, unheld = loaded
    device = resolve_device(cfg['device'])
    precision = resolve_precision(cfg['precision'], device)
    model, global_state = fed.init_model(cfg, data.spec, device)
    test_x, test_y = fed.eval_tensors(data, device)
    server = fed.make_server(cfg)
    strategy = CuriousFedAvg(cfg, server, global_state, model, test_x, test_y, log)
    log(f"training on Flower: {cfg['num_clients']} clients x {cfg['num_rounds']} rounds x {client_recipe(cfg)[0]} "
        f"local epochs on {cfg['dataset']} ({cfg['data_distribution']})")
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord.from_torch_state_dict(global_state),
                       num_rounds=cfg['num_rounds'], train_config=ConfigRecord({'experiment': json.dumps(cfg)}),
                       evaluate_fn=strategy.evaluate_global)
    finally:
        strategy.bar.close()
    if len(strategy.rounds) != cfg['num_rounds']:
        raise RuntimeError(f"Flower ran {len(strategy.rounds)} of {cfg['num_rounds']} rounds")
    return fed.write_results(cfg, data.spec, strategy.global_state, server, strategy.rounds, strategy.dp_history, parts,
                             counts, unheld, device, precision, time.perf_counter() - started, log,
                             versions={'flwr': flwr.__version__})


class _DropRunSimulationDeprecation(logging.Filter):
    # run_simulation is the programmatic entry point; its note recommends the CLI, which this engine wraps
    def filter(self, record):
        return 'run_simulation` function is deprecated' not in record.getMessage()


def train_flower(cfg, log=tqdm.write):
    """Run `cfg` on Flower's simulation engine (Ray): one virtual SuperNode per client."""
    from flwr.simulation import run_simulation

    started = time.perf_counter()
    fed.validate(cfg)
    loaded = fed.load_partitions(cfg, log)  # bad data fails here, before Ray starts
    fed.validate_model(cfg, loaded[0].spec)
    cfg = with_dp_noise(cfg, [len(p) for p in loaded[1]], log)
    device = resolve_device(cfg['device'])
    result = {}
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        result['history'] = run_server(grid, cfg, log, loaded, started)

    # one CPU per client actor; on CUDA the clients share the GPU
    gpus = 1.0 / cfg['num_clients'] if device.type == 'cuda' else 0.0
    backend_config = {'client_resources': {'num_cpus': 1, 'num_gpus': gpus},
                      'init_args': {'include_dashboard': False, 'logging_level': 'ERROR'}}
    flwr_logger = logging.getLogger('flwr')
    quiet = _DropRunSimulationDeprecation()
    flwr_logger.addFilter(quiet)
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # Flower logs every sampling step at INFO; the tqdm bar shows progress
    try:
        run_simulation(server_app=app, client_app=client_app, num_supernodes=cfg['num_clients'],
                       backend_config=backend_config)
    finally:
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(quiet)
    if 'history' not in result:
        raise RuntimeError('the Flower simulation ended without writing results (see the log above)')
    return result['history']
