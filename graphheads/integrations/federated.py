"""Federated training of graph-routed models with Flower (the ``federated`` extra).

Clients hold different slices of the built-in tasks (non-IID: each client its own task
mix) and train locally; a Flower ``ServerApp`` with the FedAvg strategy averages what
they share, weighted by their examples. Three ways to share (``mode``):

- ``"fedavg"``: every weight;
- ``"personal"``: the heads, FFNs, norms and embeddings are averaged while each client
  keeps its routers and head graphs local (personalised routing, FedBN-style; they live in
  the client's Flower ``Context.state`` between rounds);
- ``"local"``: nothing is shared (each client alone: the baseline).

``proximal_mu > 0`` adds FedProx's term ``mu / 2 * ||w - w_global||^2`` over the shared
weights to every local step.

Runs on Flower's simulation runtime (``flwr.simulation.run_simulation``, Ray backend):
:func:`run_federated`. The server writes the aggregate after each round atomically
(``global.pt``) with the round number, and one JSONL line per round (``rounds.jsonl``:
the example-weighted accuracy and each client's accuracy and head usage); a restarted
run continues from the last round. A client that fails in a round is left out of that
round's aggregate (FedAvg keeps only valid replies), so it cannot corrupt the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import Tensor, nn

from graphheads.data.tasks import IGNORE_INDEX, TASKS, TaskSuite
from graphheads.train.checkpoint import save_checkpoint, write_text_atomically
from graphheads.train.config import default_model_config
from graphheads.train.evaluation import evaluate, forward_batch
from graphheads.transformer import DecoderOnlyLM

__all__ = ["FederatedConfig", "client_tasks", "local_train", "run_federated", "shared_names"]

MODES = ("fedavg", "personal", "local")


@dataclass(frozen=True)
class FederatedConfig:
    """A federated run: clients, rounds, local training and what is shared."""

    num_clients: int = 2
    rounds: int = 3
    local_steps: int = 50  # per task a client holds, per round
    batch_size: int = 32
    lr: float = 3e-3
    mode: str = "fedavg"
    proximal_mu: float = 0.0
    seed: int = 0
    eval_batches: int = 2
    eval_batch_size: int = 64
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides
    fail_client: int = -1  # tests: this client raises in round 1 (-1: none)
    save_clients: bool = False  # also write each client's trained weights every round

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"FederatedConfig: mode must be one of {MODES}, got {self.mode!r}")
        if not 1 <= self.num_clients <= len(TASKS):
            raise ValueError(
                f"FederatedConfig: num_clients must be in [1, {len(TASKS)}] (each client "
                f"gets its own tasks), got {self.num_clients}"
            )
        for name in ("rounds", "local_steps", "batch_size", "eval_batches", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FederatedConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.proximal_mu < 0:
            raise ValueError(f"FederatedConfig: proximal_mu must be >= 0, got {self.proximal_mu}")


def client_tasks(client: int, num_clients: int) -> tuple[str, ...]:
    """The non-IID split: client c gets tasks c, c + n, c + 2n, ... of the suite."""
    return TASKS[client::num_clients]


def new_model(config: FederatedConfig) -> DecoderOnlyLM:
    """The run's model (the main job's by default; every client the same initial weights)."""
    full = TaskSuite()
    torch.manual_seed(config.seed)
    model_config = default_model_config(full.vocab_size, full.max_seq_len)
    return DecoderOnlyLM(replace(model_config, **config.model))


def shared_names(model: nn.Module, mode: str) -> list[str]:
    """The state-dict entries the server averages: every floating-point one (``fedavg``),
    all of those but the routers' and head graphs' (``personal``), none (``local``).
    Integer entries (a head graph's ``edge_index``) stay with each client: a weighted
    mean of them, truncated back to integers on loading, moved edges and made
    self-loops and duplicate edges."""
    names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
    if mode == "personal":
        return [n for n in names if ".router." not in n]
    return [] if mode == "local" else names


def sent_names(model: nn.Module, mode: str) -> list[str]:
    """What travels between server and clients: the shared entries, or in ``local`` mode
    one placeholder entry (a Flower message carries arrays; nobody reads it)."""
    return shared_names(model, mode) or [next(iter(model.state_dict()))]


def local_train(
    model: nn.Module,
    suite: TaskSuite,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    anchor: dict[str, Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> int:
    """``steps`` Adam steps on ``suite``'s tasks (plus FedProx's proximal term towards
    ``anchor`` when ``proximal_mu`` > 0). Returns the number of examples seen."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    params = dict(model.named_parameters())
    for _ in range(steps):
        batch = suite.sample(batch_size, generator)
        out, targets = forward_batch(model, batch)
        loss = F.cross_entropy(
            out.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )
        if out.routing and out.aux_loss is not None:
            loss = loss + 0.01 * out.aux_loss / len(out.routing)
        if proximal_mu > 0 and anchor:
            prox = sum((params[n] - a).square().sum() for n, a in anchor.items() if n in params)
            loss = loss + proximal_mu / 2 * prox
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size


def _client_model(
    msg: Message, context: Context, config: FederatedConfig, out_dir: Path, client: int
) -> DecoderOnlyLM:
    """The client's model: the global shared weights, and its own kept ones (from its
    Flower node state, or from its file after a restart)."""
    model = new_model(config)
    state = model.state_dict()
    kept_file = out_dir / f"client{client}_kept.pt"
    node_state: Any = context.state
    if "kept" in node_state:  # weights this client keeps between rounds
        state.update(node_state["kept"].to_torch_state_dict())
    elif kept_file.exists():
        state.update(torch.load(kept_file, map_location="cpu", weights_only=True)["state"])
    arrays: Any = msg.content["arrays"]
    incoming = arrays.to_torch_state_dict()
    state.update({n: incoming[n] for n in shared_names(model, config.mode) if n in incoming})
    model.load_state_dict(state)
    return model


def _keep(
    model: nn.Module, context: Context, config: FederatedConfig, out_dir: Path, client: int
) -> None:
    """Keep the client's own weights: in its node state and, atomically, in its file."""
    shared = set(shared_names(model, config.mode))
    kept = {n: t for n, t in model.state_dict().items() if n not in shared}
    if kept:
        context.state["kept"] = ArrayRecord(torch_state_dict=kept)
        save_checkpoint(out_dir / f"client{client}_kept.pt", {"state": kept})


def _build_client_app(config: FederatedConfig, out_dir: Path) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        settings: Any = msg.content["config"]
        absolute = int(settings["server-round"]) + int(settings["round-offset"])
        if client == config.fail_client and absolute == 1:
            raise RuntimeError(f"client {client} fails in round 1 (FederatedConfig.fail_client)")
        model = _client_model(msg, context, config, out_dir, client)
        suite = TaskSuite(client_tasks(client, config.num_clients))
        anchor = None
        if config.proximal_mu > 0:
            shared = shared_names(model, config.mode)
            anchor = {n: t.detach().clone() for n, t in model.state_dict().items() if n in shared}
        gen = torch.Generator().manual_seed(config.seed * 7919 + client * 104729 + absolute)
        seen = local_train(  # more data, more steps: local_steps per task it holds
            model,
            suite,
            steps=config.local_steps * len(suite.tasks),
            batch_size=config.batch_size,
            lr=config.lr,
            generator=gen,
            anchor=anchor,
            proximal_mu=config.proximal_mu,
        )
        _keep(model, context, config, out_dir, client)
        if config.save_clients:
            save_checkpoint(
                out_dir / f"client{client}_round{absolute}.pt",
                {"state": model.state_dict(), "examples": seen},
            )
        sent = set(sent_names(model, config.mode))
        arrays = {n: t for n, t in model.state_dict().items() if n in sent}
        reply = RecordDict(
            {
                "arrays": ArrayRecord(torch_state_dict=arrays),
                "metrics": MetricRecord({"num-examples": seen}),
            }
        )
        return Message(content=reply, reply_to=msg)

    @app.evaluate()
    def evaluate_client(msg: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        settings: Any = msg.content["config"]
        absolute = int(settings["server-round"]) + int(settings["round-offset"])
        model = _client_model(msg, context, config, out_dir, client)
        suite = TaskSuite(client_tasks(client, config.num_clients))
        result = evaluate(
            model,
            suite,
            batches=config.eval_batches,
            batch_size=config.eval_batch_size,
            seed=config.seed,
        )
        accuracy = sum(result["accuracy"].values()) / len(suite.tasks)
        usage = result.get("head_usage", {})
        per_head = torch.tensor(list(usage.values())).mean(0).flatten() if usage else None
        metrics: dict[str, Any] = {  # the same keys from every client (Flower checks)
            "num-examples": config.eval_batches * config.eval_batch_size * len(suite.tasks),
            "accuracy": accuracy,
            "client": client,
            "round": absolute,
            "usage": [] if per_head is None else per_head.tolist(),
        }
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _aggregate_evaluation(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """The example-weighted accuracy, and every client's own values as they are."""
    out: dict[str, Any] = {}
    records: list[Any] = [c["metrics"] for c in contents]
    total = sum(float(m[weight_key]) for m in records)
    out["accuracy"] = sum(float(m["accuracy"]) * float(m[weight_key]) for m in records) / max(
        total, 1.0
    )
    rounds = {int(m["round"]) for m in records}
    if len(rounds) != 1:
        raise ValueError(f"federated: evaluation replies of several rounds {sorted(rounds)}")
    out["round"] = rounds.pop()
    for metrics in records:
        client = int(metrics["client"])
        out[f"accuracy-client{client}"] = metrics["accuracy"]
        out[f"usage-client{client}"] = metrics["usage"]
    return MetricRecord(out)


def _build_server_app(config: FederatedConfig, out_dir: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model = new_model(config)
        start_round, state = 0, model.state_dict()
        checkpoint = out_dir / "global.pt"
        if checkpoint.exists():  # a restarted server continues from the last round
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
            start_round, state = int(saved["round"]), saved["state"]
        remaining = config.rounds - start_round
        if remaining <= 0:
            return
        per_round: dict[int, dict[str, Any]] = {}

        def aggregate(contents: list[RecordDict], weight_key: str) -> MetricRecord:
            record = _aggregate_evaluation(contents, weight_key)  # keyed by its own round:
            per_round[int(record["round"])] = dict(record)  # type: ignore[arg-type]
            return record

        def checkpoint_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            absolute = start_round + server_round
            global_state = arrays.to_torch_state_dict()
            save_checkpoint(checkpoint, {"round": absolute, "state": global_state})
            if config.save_clients:  # tests: every round's aggregate too
                save_checkpoint(out_dir / f"global_round{absolute}.pt", {"state": global_state})
            line = {**per_round.get(absolute, {}), "round": absolute}
            lines = _read_lines(out_dir / "rounds.jsonl", before=absolute)
            write_text_atomically(
                out_dir / "rounds.jsonl", "".join(f"{json.dumps(x)}\n" for x in [*lines, line])
            )
            return None

        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=config.num_clients,
            evaluate_metrics_aggr_fn=aggregate,
        )
        shared = sent_names(model, config.mode)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(torch_state_dict={n: state[n] for n in shared}),
            num_rounds=remaining,
            train_config=ConfigRecord({"round-offset": start_round}),
            evaluate_config=ConfigRecord({"round-offset": start_round}),
            evaluate_fn=checkpoint_round,
        )

    return app


def _read_lines(path: Path, *, before: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if int(x["round"]) < before]


CONFIG_NAME = "federated.json"
RUN_FILES = (  # a run's files besides federated.json
    "rounds.jsonl",
    "client*_kept.pt",
    "client*_round*.pt",
    "global_round*.pt",
    "global.pt",
)


def check_resumable(config: FederatedConfig, out: Path) -> None:
    """ValueError naming the settings that differ when ``out`` holds a run of another
    configuration (only ``rounds`` may grow, and the test settings differ), before
    anything in it is written."""
    path = out / CONFIG_NAME
    if not any(next(out.glob(pattern), None) is not None for pattern in RUN_FILES):
        return  # nothing to continue
    if not path.exists():  # an interrupted --restart, or a run from before federated.json
        raise ValueError(
            f"federated: {out} holds run files but no {CONFIG_NAME} to check them against; "
            "use a new folder or --restart"
        )
    saved, given = json.loads(path.read_text()), asdict(config)
    free = ("rounds", "fail_client", "save_clients")
    changed = sorted(k for k in given if k not in free and saved.get(k) != given[k])
    if changed:
        raise ValueError(
            f"federated: {out} holds a run with another configuration (changed: "
            f"{', '.join(changed)}); use a new folder, the same settings, or --restart"
        )


def run_federated(
    config: FederatedConfig, out_dir: str | Path, *, restart: bool = False
) -> list[dict[str, Any]]:
    """Run ``config`` on Flower's simulation runtime (one virtual SuperNode per client)
    and return the per-round records of ``out_dir/rounds.jsonl``. A folder holding a run
    continues it (more ``rounds``); one of another configuration is refused before
    anything is written; ``restart`` starts over (its round files are removed)."""
    out = Path(out_dir)
    if restart:  # the settings go first: a folder left half-cleared is refused, not resumed
        (out / CONFIG_NAME).unlink(missing_ok=True)
        for pattern in RUN_FILES:
            for stale in out.glob(pattern):
                stale.unlink()
    else:
        check_resumable(config, out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / CONFIG_NAME, json.dumps(asdict(config), indent=2))
    server, client = _build_server_app(config, out), _build_client_app(config, out)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=config.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": max(1, config.num_clients), "include_dashboard": False},
        },
    )
    return _read_lines(out / "rounds.jsonl", before=config.rounds + 1)


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
