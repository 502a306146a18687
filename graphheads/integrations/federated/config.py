"""A federated run's settings, its Flower run config, and what clients train and share.

This module does not use Flower itself: the settings are checked (and a run folder
refused) before Flower starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphheads.config import check_field_types, check_known_keys, model_keys
from graphheads.data.tasks import IGNORE_INDEX, TASKS, TaskSuite
from graphheads.train.config import default_model_config
from graphheads.train.evaluation import forward_batch
from graphheads.transformer import DecoderOnlyLM

MODES = ("fedavg", "personal", "local")
CONFIG_NAME = "federated.json"
RUN_FILES = (  # a run's files besides federated.json
    "rounds.jsonl",
    "rounds.png",
    "client*_kept.pt",
    "client*_round*.pt",
    "global_round*.pt",
    "global.pt",
)


@dataclass(frozen=True)
class FederatedConfig:
    """A federated run: clients, rounds, local training and what is shared."""

    num_clients: int = 2
    rounds: int = 5
    local_steps: int = 40  # per task a client holds, per round
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
        check_field_types(self)  # a run config may carry any TOML value
        check_known_keys("FederatedConfig", self.model, model_keys(), prefix="model.")
        for name in ("lr", "proximal_mu"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(
                    f"FederatedConfig: {name} must be finite, got {getattr(self, name)}"
                )
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.lr <= 0:
            raise ValueError(f"FederatedConfig: lr must be > 0, got {self.lr}")
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

    def run_config(self, out_dir: str | Path) -> dict[str, Any]:
        """The Flower run config of this run (``[tool.flwr.app.config]`` keys): every field
        by its name with dashes, ``model`` as a JSON object, and ``out-dir``."""
        values: dict[str, Any] = {"out-dir": str(out_dir)}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name.replace("_", "-")] = json.dumps(value) if f.name == "model" else value
        return values

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> tuple[FederatedConfig, Path]:
        """The settings and run folder that a Flower run config names (the inverse of
        :meth:`run_config`); ValueError naming a key that is missing or malformed."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                raise ValueError(f"federated: the run config has no {key!r}")
            values[f.name] = run_config[key]
        try:
            values["model"] = json.loads(str(values["model"]))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"federated: run config 'model' must be a JSON object, got {values['model']!r}"
            ) from err
        try:
            config = cls(**values)
        except ValueError as err:  # name the run config's keys (dashes), not the fields
            message = str(err)
            for f in fields(cls):
                message = message.replace(f" {f.name} must", f" {f.name.replace('_', '-')} must")
            raise ValueError(message.replace("FederatedConfig:", "federated: run config")) from err
        out = Path(str(run_config.get("out-dir", ""))).expanduser()
        if not out.is_absolute():  # under `flwr run` the SuperLink's folder is no one's guess
            raise ValueError(
                f"federated: run config 'out-dir' must be an absolute path, got {str(out)!r}"
            )
        return config, out


def restart_flag(run_config: dict[str, Any]) -> bool:
    """The run config's ``restart`` (a TOML bool; ``"false"`` as a string is refused
    rather than read as true: restarting deletes the run)."""
    value = run_config.get("restart", False)
    if not isinstance(value, bool):
        raise ValueError(f"federated: run config 'restart' must be true or false, got {value!r}")
    return value


def client_tasks(client: int, num_clients: int) -> tuple[str, ...]:
    """The non-IID split: client c gets tasks c, c + n, c + 2n, ... of the suite."""
    return TASKS[client::num_clients]


def new_model(config: FederatedConfig) -> DecoderOnlyLM:
    """The run's model (the main job's by default; every client the same initial weights)."""
    full = TaskSuite()
    torch.manual_seed(config.seed)
    model_config = default_model_config(full.vocab_size, full.max_seq_len)
    return DecoderOnlyLM(model_config.with_overrides(**config.model))


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
    changed = [
        f"{k} {saved.get(k)!r} -> {given[k]!r}"
        for k in sorted(given)
        if k not in free and saved.get(k) != given[k]
    ]
    if changed:
        raise ValueError(
            f"federated: {out} holds a run with another configuration (changed: "
            f"{', '.join(changed)}); use a new folder, the same settings, or restart it "
            "(--restart; restart=true under flwr run)"
        )
    done = _rounds_done(out)
    if config.rounds < done:
        raise ValueError(
            f"federated: {out} holds {done} rounds already; rounds ({config.rounds}) may "
            "only grow (or restart the folder)"
        )


def _rounds_done(out: Path) -> int:
    """The last round the run in ``out`` checkpointed (0 when none)."""
    if not (out / "global.pt").exists():
        return 0
    return int(torch.load(out / "global.pt", map_location="cpu", weights_only=True)["round"])


def clear_run(out: Path) -> None:
    """Remove a run's files from ``out``, the settings first: a folder left half-cleared
    is refused by :func:`check_resumable`, not resumed."""
    (out / CONFIG_NAME).unlink(missing_ok=True)
    for pattern in RUN_FILES:
        for stale in out.glob(pattern):
            stale.unlink()


def read_rounds(path: Path, *, before: int) -> list[dict[str, Any]]:
    """The lines of ``rounds.jsonl`` for rounds below ``before`` (none if it is absent)."""
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if int(x["round"]) < before]
