"""Run configuration: model, data and optimisation, from files and ``key=value`` flags."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from graphheads.config import ModelConfig, check_field_types, check_known_keys, model_keys
from graphheads.data import ALL_TASKS, TASKS

__all__ = [
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "default_model_config",
    "describe_settings",
]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    steps: int = 2500  # optimiser steps
    batch_size: int = 32  # global batch (split across DDP ranks)
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.1  # final learning rate = lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    aux_loss_weight: float = 0.01  # beta: weight of the mean load-balance loss
    eval_every: int = 250  # steps between evaluations (and at the end)
    eval_batches: int = 4  # evaluation batches (of eval_batch_size rows)
    eval_batch_size: int = 128  # rows per evaluation batch
    checkpoint_every: int = 250  # steps between checkpoints (and at the end)
    log_every: int = 20  # steps between train-metric lines
    seed: int = 0  # seeds the model's initial weights and every batch
    model_type: str = "lm"  # "lm": DecoderOnlyLM; "seq2seq": encoder-decoder Transformer
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK / cuda when available, else cpu), "cpu", ...
    precision: str = "fp32"  # "fp32", "bf16" (autocast; also on CPU), "fp16" (CUDA only)
    compile: bool = False  # torch.compile the model
    grad_accum: int = 1  # micro-batches per optimiser step (batch_size is the global batch)
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    parallel: str = "ddp"  # several processes: "ddp" (replicas) or "fsdp" (FSDP2 shards)
    log_to: str = "jsonl"  # "jsonl" (metrics.jsonl), "tensorboard" (also RUN/tensorboard)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.model_type not in ("lm", "seq2seq"):
            raise ValueError(
                f"TrainConfig: model_type must be 'lm' or 'seq2seq', got {self.model_type!r}"
            )
        for name in (
            "steps",
            "batch_size",
            "eval_every",
            "eval_batches",
            "eval_batch_size",
            "checkpoint_every",
            "log_every",
            "grad_accum",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {value!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(
                f"TrainConfig: parallel must be 'ddp' or 'fsdp', got {self.parallel!r}"
            )
        if self.log_to not in ("jsonl", "tensorboard"):
            raise ValueError(
                f"TrainConfig: log_to must be 'jsonl' or 'tensorboard', got {self.log_to!r}"
            )
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(
                f"TrainConfig: precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}"
            )
        for flag in ("compile", "activation_checkpointing"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(
                    f"TrainConfig: {flag} must be true or false, got {getattr(self, flag)!r}"
                )
        if self.lr <= 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"TrainConfig: need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got "
                f"{self.warmup_steps} and {self.min_lr_ratio}"
            )
        if self.grad_clip < 0 or self.aux_loss_weight < 0:
            raise ValueError(
                f"TrainConfig: grad_clip ({self.grad_clip}) and aux_loss_weight "
                f"({self.aux_loss_weight}) must be >= 0"
            )


@dataclass(frozen=True)
class DataConfig:
    """What to train on: the built-in task suite, or byte-level text when ``text`` is set."""

    tasks: tuple[str, ...] = TASKS  # built-in tasks (graphheads.data.TASKS; opt-in: hops)
    length: int = 6  # symbols per prompt
    num_symbols: int = 16  # data symbols in the vocabulary (mqar: keys, then values)
    modulus: int = 11  # modadd's modulus
    hops: int = 2  # hops' links to follow from its start symbol (at most length / 2)
    text: str | None = None  # a UTF-8 file or folder: byte-level LM instead of tasks
    tokens: str | None = None  # a folder from `graphheads prepare`: token shards (memmap)
    seq_len: int = 128  # window length for text and tokens

    def __post_init__(self) -> None:
        tasks = self.tasks
        if isinstance(tasks, str):  # "copy,sort" or "copy" (from --set or a YAML scalar)
            tasks = tuple(t.strip() for t in tasks.split(",") if t.strip())
        if not isinstance(tasks, list | tuple):
            raise ValueError(f"DataConfig: tasks must be a list of task names, got {tasks!r}")
        object.__setattr__(self, "tasks", tuple(tasks))
        for name in ("text", "tokens"):  # a path given from Python
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        check_field_types(self)
        if isinstance(self.hops, bool) or not isinstance(self.hops, int) or self.hops < 1:
            raise ValueError(f"DataConfig: hops must be a positive int, got {self.hops!r}")
        if self.text is not None and self.tokens is not None:
            raise ValueError("DataConfig: set data.text or data.tokens, not both")
        if not self.tasks:
            raise ValueError(f"DataConfig: tasks must name at least one task of {list(ALL_TASKS)}")
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"DataConfig: unknown task(s) {unknown}; known: {list(ALL_TASKS)}")


_YAML_FLOAT = re.compile(  # YAML 1.2's floats: PyYAML (1.1) reads 3e-4 as text
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON or YAML (``.yaml``/``.yml``) file; FileNotFoundError or
    ValueError naming the file when it is missing or holds something else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"config file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err.reason})") from err
    if path.suffix in (".yaml", ".yml"):
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
        try:
            values = yaml.load(text, Loader=Loader) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            reason = getattr(err, "problem", None) or err
            raise ValueError(f"config file {path} is not valid YAML{line}: {reason}") from err
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"config file {path} is not valid JSON (line {err.lineno}): {err.msg}"
            ) from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(values).__name__}")
    return values


def default_model_config(vocab_size: int, max_seq_len: int) -> ModelConfig:
    """The main job's model: a small Graph-of-Heads LM (8 heads, 2 shared, top-3)."""
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=64,
        num_heads=8,
        num_layers=2,
        d_ff=128,
        max_seq_len=max_seq_len,
        norm_first=True,
        attention="goh",
        num_shared=2,
        top_k=3,
        graph="complete",
        graph_learnable="edge",
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: ``model`` (partial ModelConfig fields; vocab_size and
    max_seq_len come from the data; ``preset`` starts from a Llama-style size of
    :data:`~graphheads.config.LLAMA_PRESETS` instead of the default model), ``data`` and
    ``train``."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.model, dict):
            raise ValueError(f"RunConfig: model must be a mapping of keys, got {self.model!r}")
        known = model_keys() | {"preset"}
        check_known_keys("RunConfig", self.model, known, prefix="model.")

    def model_config(self, vocab_size: int, max_seq_len: int) -> ModelConfig:
        """The model for data with this vocabulary and longest sequence."""
        given = self.model.get("vocab_size", vocab_size)
        if given != vocab_size:
            raise ValueError(f"RunConfig: model.vocab_size ({given}) != the data's ({vocab_size})")
        overrides = {k: v for k, v in self.model.items() if k not in ("vocab_size", "preset")}
        if "preset" in self.model:  # a Llama-style size (ModelConfig.llama)
            overrides.setdefault("max_seq_len", max_seq_len)
            return ModelConfig.llama(str(self.model["preset"]), vocab_size, **overrides)
        return default_model_config(vocab_size, max_seq_len).with_overrides(**overrides)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self.data)
        data["tasks"] = list(self.data.tasks)
        if self.data.text is not None or self.data.tokens is not None:
            del data["tasks"]  # a corpus run trains on no task
        return {"model": dict(self.model), "data": data, "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """From nested dicts; unknown sections or keys raise ValueError naming them."""
        check_known_keys("RunConfig", values, {"model", "data", "train"})
        for name in ("model", "data", "train"):
            section = values.get(name)
            if section is not None and not isinstance(section, dict):
                raise ValueError(
                    f"RunConfig: section {name!r} must be a mapping of keys, got {section!r}"
                )
        parts: dict[str, Any] = {"model": dict(values.get("model") or {})}
        for name, klass in (("data", DataConfig), ("train", TrainConfig)):
            section = dict(values.get(name) or {})
            check_known_keys(
                "RunConfig", section, {f.name for f in fields(klass)}, prefix=f"{name}."
            )
            parts[name] = klass(**section)
        return cls(**parts)

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
    ) -> RunConfig:
        """From a JSON or YAML file (optional; a run folder's ``config.json`` too) and
        ``section.key=value`` overrides, whose
        values are parsed as JSON when they can be (``3``, ``true``, ``["copy"]``); a list
        setting also takes a comma list (``data.tasks=copy,sort``)."""
        values: dict[str, Any] = {} if path is None else read_config_file(path)
        if set(values) == {"run", "model"} and isinstance(values["run"], dict):
            values = values["run"]  # a run folder's config.json: its run settings
        return cls.from_dict(apply_overrides(values, overrides))


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``values`` (nested sections) with ``section.key=value`` overrides applied (a new
    dict); values are parsed as JSON when they can be (``3``, ``true``, ``["copy"]``)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping")
        values[section][name] = value
    return values


def _field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of dataclass ``cls`` in its source (its meaning)."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # an install without sources: no meanings to show
        return {}
    return dict(re.findall(r"^    (\w+): [^=\n]+(?:= [^#\n]*)?#\s*(.*)$", source, re.M))


def _yaml_value(value: Any) -> str:
    """JSON, which YAML reads, but floats with a dot: YAML 1.1 reads ``1e-05`` as text."""
    text = json.dumps(value)
    if isinstance(value, float) and "e" in text and "." not in text:
        text = text.replace("e", ".0e")
    return text


def describe_settings() -> str:
    """Every setting of ``graphheads train`` with its default and meaning, as a YAML file
    that loads back to the defaults (``graphheads config > run.yaml``)."""
    from graphheads.data import TaskSuite

    suite = TaskSuite()
    model = asdict(default_model_config(suite.vocab_size, suite.max_seq_len))
    sections: list[tuple[str, type, dict[str, Any]]] = [
        ("model", ModelConfig, model),
        ("data", DataConfig, RunConfig().to_dict()["data"]),
        ("train", TrainConfig, asdict(TrainConfig())),
    ]
    lines = [
        "# graphheads train: every setting, its default and its meaning. Set one with",
        "# --set section.key=value, or save this as run.yaml, edit it and pass --config.",
        "# model.preset (a Llama-style size, e.g. llama-10m) replaces the model defaults",
        "# below: use it in a file without them, or every key listed here overrides it.",
    ]
    for name, cls, values in sections:
        comments = _field_comments(cls)
        lines.append(f"{name}:")
        for f in fields(cls):
            comment = comments.get(f.name, "")
            if name == "model" and f.name in ("vocab_size", "max_seq_len"):
                lines.append(f"  # {f.name}: (from the data)  # {comment}")
                continue
            value = _yaml_value(list(values[f.name]) if f.name == "tasks" else values[f.name])
            lines.append(f"  {f.name}: {value}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines) + "\n"
