"""Federated training of graph-routed models with Flower (the ``federated`` extra).

Clients hold different slices of the built-in tasks (non-IID: each client its own task
mix) and train locally; the server runs Flower's ``FedAvg`` strategy (the
example-weighted mean), or its ``FedProx`` when ``proximal_mu`` > 0. Three ways to share
(``mode``):

- ``"fedavg"``: every floating-point weight;
- ``"personal"``: the heads, FFNs, norms and embeddings are averaged while each client
  keeps its routers and head graphs (personalised routing, FedBN-style);
- ``"local"``: nothing is shared (each client alone: the baseline).

It is a Flower app: :mod:`~graphheads.integrations.federated.app` holds the module-level
``server_app`` and ``client_app`` that read ``context.run_config``, and the folder
``APP_DIR`` (``flower_app/``) holds the ``pyproject.toml`` that ``flwr run`` takes.
:func:`run_federated` (``graphheads federated``) runs the same app in-process. The server
writes the run's state after each round atomically (``global.pt``: round, aggregate and
each client's kept weights) and one JSONL line per round (``rounds.jsonl``); a restarted
run continues from the last round. A client that fails in a round is left out of that
round's aggregate.
"""

try:  # the extra's package, named in the error rather than a bare ModuleNotFoundError
    import flwr  # noqa: F401
except ImportError as err:
    raise ModuleNotFoundError(
        f"graphheads.integrations.federated needs the 'federated' extra ({err.name} is "
        "missing): pip install 'graphheads[federated]'",
        name=err.name,
    ) from err

from graphheads.integrations.federated.app import client_app, server_app
from graphheads.integrations.federated.config import (
    CONFIG_NAME,
    MODES,
    FederatedConfig,
    client_tasks,
    local_train,
    new_model,
    sent_names,
    shared_names,
)
from graphheads.integrations.federated.run import APP_DIR, plot_rounds, run_federated

__all__ = [
    "APP_DIR",
    "CONFIG_NAME",
    "MODES",
    "FederatedConfig",
    "client_app",
    "client_tasks",
    "local_train",
    "new_model",
    "plot_rounds",
    "run_federated",
    "sent_names",
    "server_app",
    "shared_names",
]
