"""The Flower App's entry points for `flwr run flower_app`; the code is the repository's src/flower_engine.py
(start the SuperLink and SuperNodes with the repository on PYTHONPATH)."""
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import config
from src import flower_engine
from src.utils import UserError

client_app = flower_engine.client_app
server_app = ServerApp()


def config_from_run_config(run_config):
    """A deployment's settings (pyproject.toml, `flwr run --run-config`): config.py, the preset, then the set
    values. Keys are config.py's with '-' for '_'; "" leaves a setting to the preset / config.py."""
    settings = {k.replace('-', '_'): v for k, v in run_config.items() if v != ''}
    preset = settings.pop('preset', None)
    settings['engine'] = 'flower'
    try:
        return config.resolve(preset, settings)
    except ValueError as e:
        raise UserError(str(e)) from None


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    flower_engine.run_server(grid, config_from_run_config(context.run_config))
