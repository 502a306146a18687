"""The Flower app: ``client_app`` and ``server_app``, the components that
``flower_app/pyproject.toml`` names for ``flwr run`` and that :func:`run_federated` runs
in-process. Both read their settings from ``context.run_config``
(:meth:`FederatedConfig.run_config`).

The server runs Flower's ``FedAvg`` strategy, or its ``FedProx`` when ``proximal-mu`` > 0
(FedAvg's aggregation; it sends ``proximal-mu`` to the clients, which add the proximal
term). Every
reply carries, besides the shared arrays, the weights the client keeps (its routers in
``personal`` mode, integer buffers always) in a ``ConfigRecord``: the server writes them
into its checkpoint and, after a restart, sends each client its own until that client has
trained again (a query message first asks each SuperNode which client it holds). Clients
write no files; everything they return travels in messages.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
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
    restart_flag,
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
    missing = [k for k in ("partition-id", "num-partitions") if k not in context.node_config]
    if missing:
        raise ValueError(
            f"federated: the SuperNode's node config has no {missing}: the graphheads app "
            "runs on Flower's simulation runtime, which gives every node its partition"
        )
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
    shared_set = set(shared)
    anchor = {n: t.detach().clone() for n, t in model.state_dict().items() if n in shared_set}
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
    kept = {n: t for n, t in state.items() if n not in shared_set}
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


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    """Which partition this SuperNode holds (the server asks after a restart)."""
    _, client = _settings(context)
    reply = RecordDict({"client": ConfigRecord({"partition-id": client})})
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
    records: list[Any] = sorted((c["metrics"] for c in contents), key=lambda m: int(m["client"]))
    total = sum(float(m[weight_key]) for m in records)
    out["accuracy"] = sum(float(m["accuracy"]) * float(m[weight_key]) for m in records) / max(
        total, 1.0
    )
    rounds = {int(m["round"]) for m in records}
    if len(rounds) != 1:
        raise ValueError(f"federated: evaluation replies of several rounds {sorted(rounds)}")
    out["round"] = rounds.pop()
    for metrics in records:  # in client order: sums that do not depend on arrival
        client = int(metrics["client"])
        out[f"accuracy-client{client}"] = metrics["accuracy"]
        out[f"usage-client{client}"] = metrics["usage"]
    return MetricRecord(out)


class _RunState:
    """What the graphheads strategies add to Flower's: each client's kept weights are
    collected from its reply and, after a restart, sent back to that client alone until
    it has trained again; the run is checkpointed after every round (``rounds.jsonl``
    first, then ``global.pt``, atomically: round, aggregate and kept weights)."""

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
        self.pending = set(kept)  # clients whose kept weights only the server holds
        self.partitions: dict[int, int] = {}  # SuperNode id -> client (partition)
        self.trained: dict[int, tuple[dict[str, Tensor], int]] = {}  # save_clients only

    def ask_partitions(self, grid: Grid) -> None:
        """Learn which SuperNode holds which client (a restart sends each its own)."""
        nodes = list(grid.get_node_ids())
        replies = grid.send_and_receive(
            [
                Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                for n in nodes
            ]
        )
        for reply in replies:
            if not reply.has_error():
                client: Any = reply.content["client"]
                self.partitions[reply.metadata.src_node_id] = int(client["partition-id"])

    def _with_kept(self, messages: Iterable[Message]) -> list[Message]:
        """Each message to a client the server holds kept weights for gets its own copy of
        the content with those weights (the round's messages share one RecordDict)."""
        messages = list(messages)
        for message in messages:
            client = self.partitions.get(message.metadata.dst_node_id)
            if client in self.pending:
                own = ConfigRecord({f"client{client}": _to_bytes(self.kept[client])})
                message.content = RecordDict({**message.content, "kept": own})
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return self._with_kept(
            super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return self._with_kept(
            super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        )

    def collect(self, replies: Iterable[Message]) -> list[Message]:
        """Take each valid reply's kept weights; the replies in client order (sums that do
        not depend on arrival). RuntimeError when no client trained: a round of nothing
        but failures is not a round."""
        valid: list[tuple[int, Message]] = []
        failed: list[str] = []
        for reply in replies:
            if reply.has_error():
                failed.append(str(reply.error.reason))
                continue
            content: Any = reply.content
            try:
                client = int(content["client"]["partition-id"])
                kept = _from_bytes(content["client"]["kept"])
            except (KeyError, ValueError, RuntimeError) as err:  # not one of our replies
                failed.append(f"malformed reply ({err})")
                continue
            self.kept[client] = kept
            self.pending.discard(client)
            self.partitions[reply.metadata.src_node_id] = client
            valid.append((client, reply))
            if self.config.save_clients:
                arrays = content["arrays"].to_torch_state_dict()
                self.trained[client] = (arrays, int(content["metrics"]["num-examples"]))
        if not valid:
            raise RuntimeError(f"federated: every client failed this round: {failed}")
        return [reply for _, reply in sorted(valid, key=lambda x: x[0])]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, self.collect(replies))  # type: ignore[misc]

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """After each round (Flower's ``evaluate_fn``): write the run's state, its
        ``global.pt`` last (a run stopped before that redoes the round and its line)."""
        if server_round == 0:
            return None
        absolute = self.start_round + server_round
        state = arrays.to_torch_state_dict()
        line = {**self.per_round.get(absolute, {}), "round": absolute}
        lines = read_rounds(self.out / "rounds.jsonl", before=absolute)
        write_text_atomically(
            self.out / "rounds.jsonl", "".join(f"{json.dumps(x)}\n" for x in [*lines, line])
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
        save_checkpoint(
            self.out / "global.pt", {"round": absolute, "state": state, "kept": self.kept}
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


def _saved_run(out: Path, model: DecoderOnlyLM) -> tuple[int, dict[str, Tensor], dict[int, Any]]:
    """(last round, aggregate, kept weights) of the run in ``out`` (nothing: round 0).
    A folder of graphheads before 0.3 kept each client's weights in its own file."""
    if not (out / "global.pt").exists():
        return 0, model.state_dict(), {}
    saved = torch.load(out / "global.pt", map_location="cpu", weights_only=True)
    kept = saved.get("kept")
    if kept is None:
        kept = {
            int(path.name.removeprefix("client").removesuffix("_kept.pt")): torch.load(
                path, map_location="cpu", weights_only=True
            )["state"]
            for path in out.glob("client*_kept.pt")
        }
    return int(saved["round"]), saved["state"], kept


def _federation_size(grid: Grid, timeout: float = 60.0) -> int:
    """The SuperNodes of the simulation federation, once they have registered (all at
    once, a moment after the ServerApp starts)."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now and now == count:  # registered, and no more arriving
            return now
        count = now
        time.sleep(0.2)
    return count


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    config, out = FederatedConfig.from_run_config(dict(context.run_config))
    prepare_run_folder(config, out, restart=restart_flag(dict(context.run_config)))
    nodes = _federation_size(grid)
    if nodes != config.num_clients:  # too few would wait for ever, too many fail each round
        raise ValueError(
            f"federated: the federation has {nodes} SuperNodes but the run config says "
            f"num-clients = {config.num_clients}; set both to the same number"
        )
    model = new_model(config)
    start_round, state, kept = _saved_run(out, model)
    if config.rounds <= start_round:
        return
    strategy = strategy_for(config, out, start_round, kept)
    if kept:  # a restart: each client gets its kept weights back, and only its own
        strategy.ask_partitions(grid)
    shared = sent_names(model, config.mode)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(torch_state_dict={n: state[n] for n in shared}),
        num_rounds=config.rounds - start_round,
        train_config=ConfigRecord({"round-offset": start_round}),
        evaluate_config=ConfigRecord({"round-offset": start_round}),
        evaluate_fn=strategy.checkpoint,
    )
