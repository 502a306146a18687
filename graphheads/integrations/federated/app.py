"""The Flower app: ``client_app`` and ``server_app``, the components that
``flower_app/pyproject.toml`` names for ``flwr run`` and that :func:`run_federated` runs
in-process. Both read their settings from ``context.run_config``
(:meth:`FederatedConfig.run_config`).

The server runs Flower's ``FedAvg`` strategy, or its ``FedProx`` when ``proximal-mu`` > 0
(FedAvg's aggregation; it sends ``proximal-mu`` to the clients, which add the proximal
term). Every
reply carries, besides the shared arrays, the weights the client keeps (its routers in
``personal`` mode, integer buffers always) in a ``ConfigRecord``: the server writes them
into its checkpoint and, on the first round after a restart, sends them back (each client
takes its own). Clients write no files; everything they return travels in messages.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from torch import Tensor

from graphheads.data.tasks import TaskSuite
from graphheads.integrations.federated.config import (
    CONFIG_NAME,
    FederatedConfig,
    check_resumable,
    clear_run,
    client_tasks,
    local_train,
    new_model,
    read_rounds,
    sent_names,
    shared_names,
)
from graphheads.train.checkpoint import save_checkpoint, write_text_atomically
from graphheads.train.evaluation import evaluate
from graphheads.transformer import DecoderOnlyLM

__all__ = ["client_app", "prepare_run_folder", "server_app"]

client_app = ClientApp()
server_app = ServerApp()


def prepare_run_folder(config: FederatedConfig, out: Path, *, restart: bool) -> None:
    """Start ``out`` over (``restart``) or check that it holds nothing or a run of these
    settings (refused by name otherwise, before anything is written); then record them."""
    if restart:
        clear_run(out)
    else:
        check_resumable(config, out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / CONFIG_NAME, json.dumps(asdict(config), indent=2))


def _to_bytes(state: dict[str, Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> dict[str, Tensor]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _settings(context: Context) -> tuple[FederatedConfig, int]:
    """The run's settings and this client's partition (checked against the federation)."""
    config, _ = FederatedConfig.from_run_config(dict(context.run_config))
    client, partitions = (int(context.node_config[k]) for k in ("partition-id", "num-partitions"))
    if partitions != config.num_clients:
        raise ValueError(
            f"federated: the federation has {partitions} SuperNodes but the run config says "
            f"num-clients = {config.num_clients}; set both to the same number"
        )
    return config, client


def _client_model(msg: Message, context: Context, config: FederatedConfig) -> DecoderOnlyLM:
    """The global shared weights and the client's kept ones: from its node state within
    a run, from the server's message after a restart, else the initial ones."""
    model = new_model(config)
    state = model.state_dict()
    node_state: Any = context.state
    content: Any = msg.content
    client = int(context.node_config["partition-id"])
    if "kept" in node_state:
        state.update(node_state["kept"].to_torch_state_dict())
    elif "kept" in content and f"client{client}" in content["kept"]:
        state.update(_from_bytes(content["kept"][f"client{client}"]))
    incoming = content["arrays"].to_torch_state_dict()
    state.update({n: incoming[n] for n in shared_names(model, config.mode) if n in incoming})
    model.load_state_dict(state)
    return model


def _round(msg: Message) -> int:
    settings: Any = msg.content["config"]
    return int(settings["server-round"]) + int(settings["round-offset"])


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    config, client = _settings(context)
    absolute = _round(msg)
    if client == config.fail_client and absolute == 1:
        raise RuntimeError(f"client {client} fails in round 1 (FederatedConfig.fail_client)")
    model = _client_model(msg, context, config)
    suite = TaskSuite(client_tasks(client, config.num_clients))
    settings: Any = msg.content["config"]
    mu = float(settings.get("proximal-mu", 0.0))  # sent by FedProx
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
        anchor=anchor if mu > 0 else None,
        proximal_mu=mu,
    )
    state = model.state_dict()
    kept = {n: t for n, t in state.items() if n not in set(shared)}
    context.state["kept"] = ArrayRecord(torch_state_dict=kept)
    sent = set(sent_names(model, config.mode))
    reply = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict={n: t for n, t in state.items() if n in sent}),
            "metrics": MetricRecord({"num-examples": seen}),
            "client": ConfigRecord({"partition-id": client, "kept": _to_bytes(kept)}),
        }
    )
    return Message(content=reply, reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    config, client = _settings(context)
    model = _client_model(msg, context, config)
    suite = TaskSuite(client_tasks(client, config.num_clients))
    result = evaluate(
        model, suite, batches=config.eval_batches, batch_size=config.eval_batch_size,
        seed=config.seed,
    )  # fmt: skip
    usage = result.get("head_usage", {})
    per_head = torch.tensor(list(usage.values())).mean(0).flatten() if usage else None
    metrics: dict[str, Any] = {  # the same keys from every client (Flower checks)
        "num-examples": config.eval_batches * config.eval_batch_size * len(suite.tasks),
        "accuracy": sum(result["accuracy"].values()) / len(suite.tasks),
        "client": client,
        "round": _round(msg),
        "usage": [] if per_head is None else per_head.tolist(),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


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
    for metrics in sorted(records, key=lambda m: int(m["client"])):
        client = int(metrics["client"])
        out[f"accuracy-client{client}"] = metrics["accuracy"]
        out[f"usage-client{client}"] = metrics["usage"]
    return MetricRecord(out)


class _RunState:
    """What the graphheads strategies add to Flower's: each client's kept weights are
    collected from its reply and returned on the first round after a restart, and the
    run is checkpointed after every round (``global.pt``, atomically: round, aggregate
    and kept weights; one ``rounds.jsonl`` line)."""

    def __init__(
        self, config: FederatedConfig, out: Path, start_round: int,
        kept: dict[int, dict[str, Tensor]], **kwargs: Any,
    ) -> None:  # fmt: skip
        self.per_round: dict[int, dict[str, Any]] = {}

        def aggregate(contents: list[RecordDict], weight_key: str) -> MetricRecord:
            record = _aggregate_evaluation(contents, weight_key)  # keyed by its own round
            self.per_round[int(record["round"])] = dict(record)  # type: ignore[arg-type]
            return record

        super().__init__(  # type: ignore[call-arg]
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=config.num_clients,
            evaluate_metrics_aggr_fn=aggregate,
            **kwargs,
        )
        self.config, self.out, self.start_round, self.kept = config, out, start_round, kept
        self.trained: dict[int, tuple[dict[str, Tensor], int]] = {}  # save_clients only

    def _with_kept(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if server_round == 1 and self.kept:  # a restart: clients have no node state
            record: dict[str, Any] = {f"client{c}": _to_bytes(s) for c, s in self.kept.items()}
            for message in messages:
                message.content["kept"] = ConfigRecord(record)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return self._with_kept(
            server_round,
            super().configure_train(server_round, arrays, config, grid),  # type: ignore[misc]
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return self._with_kept(
            server_round,
            super().configure_evaluate(server_round, arrays, config, grid),  # type: ignore[misc]
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            content: Any = reply.content
            client = int(content["client"]["partition-id"])
            self.kept[client] = _from_bytes(content["client"]["kept"])
            if self.config.save_clients:
                arrays = content["arrays"].to_torch_state_dict()
                self.trained[client] = (arrays, int(content["metrics"]["num-examples"]))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """After each round (Flower's ``evaluate_fn``): write the run's state."""
        if server_round == 0:
            return None
        absolute = self.start_round + server_round
        state = arrays.to_torch_state_dict()
        save_checkpoint(
            self.out / "global.pt", {"round": absolute, "state": state, "kept": self.kept}
        )
        if self.config.save_clients:  # tests: every round's aggregate and clients' weights
            save_checkpoint(self.out / f"global_round{absolute}.pt", {"state": state})
            for client, (sent, examples) in self.trained.items():
                full = {**sent, **self.kept[client]}
                save_checkpoint(
                    self.out / f"client{client}_round{absolute}.pt",
                    {"state": full, "examples": examples},
                )
            self.trained.clear()
        line = {**self.per_round.get(absolute, {}), "round": absolute}
        lines = read_rounds(self.out / "rounds.jsonl", before=absolute)
        write_text_atomically(
            self.out / "rounds.jsonl", "".join(f"{json.dumps(x)}\n" for x in [*lines, line])
        )
        return None


class GraphHeadsFedAvg(_RunState, FedAvg):
    """Flower's ``FedAvg`` (the example-weighted mean of the shared arrays) with the run's
    state: kept weights and checkpoints."""


class GraphHeadsFedProx(_RunState, FedProx):
    """Flower's ``FedProx``: ``FedAvg`` that sends ``proximal-mu`` to the clients, which
    add ``mu / 2 * ||w - w_global||^2`` over the shared weights to every local step."""


def strategy_for(
    config: FederatedConfig, out: Path, start_round: int, kept: dict[int, dict[str, Tensor]]
) -> GraphHeadsFedAvg | GraphHeadsFedProx:
    """FedProx when ``config.proximal_mu`` > 0, else FedAvg."""
    if config.proximal_mu > 0:
        return GraphHeadsFedProx(config, out, start_round, kept, proximal_mu=config.proximal_mu)
    return GraphHeadsFedAvg(config, out, start_round, kept)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    config, out = FederatedConfig.from_run_config(dict(context.run_config))
    prepare_run_folder(config, out, restart=bool(context.run_config.get("restart", False)))
    model = new_model(config)
    start_round, state, kept = 0, model.state_dict(), {}
    if (out / "global.pt").exists():  # a restarted server continues from the last round
        saved = torch.load(out / "global.pt", map_location="cpu", weights_only=True)
        start_round, state, kept = int(saved["round"]), saved["state"], saved["kept"]
    if config.rounds <= start_round:
        return
    strategy = strategy_for(config, out, start_round, kept)
    shared = sent_names(model, config.mode)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(torch_state_dict={n: state[n] for n in shared}),
        num_rounds=config.rounds - start_round,
        train_config=ConfigRecord({"round-offset": start_round}),
        evaluate_config=ConfigRecord({"round-offset": start_round}),
        evaluate_fn=strategy.checkpoint,
    )
