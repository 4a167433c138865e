"""The Flower App's entry points for `flwr run flower_app`; the code is the repository's src/flower_engine.py
(start the SuperLink and SuperNodes with the repository on PYTHONPATH)."""
from src import flower_engine

server_app = flower_engine.server_app
client_app = flower_engine.client_app
