"""Run the Flower app in-process (what ``graphheads federated`` does) and draw its rounds."""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from graphheads.integrations.federated.app import prepare_run_folder
from graphheads.integrations.federated.config import FederatedConfig, read_rounds

APP_DIR = Path(__file__).parent / "flower_app"  # the app folder that `flwr run` takes
SERVER_APP = "graphheads.integrations.federated.app:server_app"  # as the app folder names
CLIENT_APP = "graphheads.integrations.federated.app:client_app"
_SECTION = "[tool.flwr.app.config]"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return (
        repr(value)
        if isinstance(value, int | float)
        else json.dumps(str(value), ensure_ascii=False)
    )


def write_app(folder: Path, run_config: dict[str, Any]) -> Path:
    """A copy of the Flower app in ``folder`` whose run config is ``run_config`` (what
    ``flwr run --run-config`` would give it; every key of the app's config). Returns the
    folder."""
    head, _, section = (APP_DIR / "pyproject.toml").read_text().partition(_SECTION)
    keys = re.findall(r"^([a-z-]+) =", section, flags=re.MULTILINE)
    if sorted(keys) != sorted(run_config):
        raise ValueError(
            f"federated: the run config's keys {sorted(run_config)} are not the app's {keys}"
        )
    lines = [f"{k} = {_toml_value(run_config[k])}\n" for k in keys]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(head + _SECTION + "\n" + "".join(lines))
    return folder


def run_federated(
    config: FederatedConfig, out_dir: str | Path, *, restart: bool = False
) -> list[dict[str, Any]]:
    """Run the graphheads Flower app (``APP_DIR``) on Flower's simulation runtime, one
    virtual SuperNode per client, in this process: the same components, strategy and run
    config as ``flwr run APP_DIR`` with ``--run-config`` set to ``config`` (the same
    ``rounds.jsonl`` for the same seed). Returns the per-round records of
    ``out_dir/rounds.jsonl``. A folder holding a run continues it (more ``rounds``); one of
    another configuration is refused before anything is written; ``restart`` starts over.
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    out = Path(out_dir).expanduser().resolve()
    prepare_run_folder(config, out, restart=restart)  # refusals before Ray starts
    run_config = {**config.run_config(out), "restart": False}
    with tempfile.TemporaryDirectory(prefix="graphheads-flower-app-") as folder:
        app = write_app(Path(folder), run_config)
        # What `flwr run` does on the local simulation federation, minus the SuperLink
        # (flwr's own simulation process makes this same call): Flower's public
        # `run_simulation` takes no run config and is deprecated in favour of `flwr run`.
        with warnings.catch_warnings():  # Ray's tip on GPU variables (clients use no GPU)
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
            _run_simulation(
                num_supernodes=config.num_clients,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                backend_name="ray",  # Flower's default resources, as `flwr run` gives them
                backend_config={},  # (2 CPUs a client: the same threads, the same floats)
                app_dir=str(app),
                is_app=True,
                server_app_context=Context(
                    run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
                ),
                server_app_attr=SERVER_APP,
                client_app_attr=CLIENT_APP,
            )
    return read_rounds(out / "rounds.jsonl", before=config.rounds + 1)


def plot_rounds(records: list[dict[str, Any]], path: str | Path, *, num_heads: int = 8) -> Path:
    """Accuracy per round (example-weighted, and each client's), and each client's head
    usage after the last round (per layer x head, averaged over its tasks)."""
    import matplotlib.pyplot as plt

    clients = sorted(
        int(k.removeprefix("accuracy-client"))
        for k in records[-1]
        if k.startswith("accuracy-client")
    )
    fig, axes = plt.subplots(1, 1 + len(clients), figsize=(4.2 + 3.0 * len(clients), 3.4))
    rounds = [r["round"] for r in records]
    axes[0].plot(rounds, [r["accuracy"] for r in records], "k-o", label="weighted")
    for c in clients:
        values = [r.get(f"accuracy-client{c}") for r in records]
        axes[0].plot(rounds, values, "--o", label=f"client {c}")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("accuracy on own tasks")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    for ax, c in zip(axes[1:], clients, strict=True):
        usage = torch.tensor(records[-1][f"usage-client{c}"], dtype=torch.float32)
        if usage.numel():
            grid = usage.view(-1, num_heads)  # (layers, heads)
            ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto")
            ax.set_yticks(range(grid.size(0)))
        ax.set_title(f"client {c}: head usage", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
