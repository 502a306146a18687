"""The configuration of graphheads' models (:class:`~graphheads.transformer.DecoderOnlyLM`,
:class:`~graphheads.transformer.Transformer`): one frozen dataclass, a comment per field.
"""

from __future__ import annotations

import difflib
import functools
import numbers
import types
import typing
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Union

from graphheads.gnn import CONVS
from graphheads.graph import PRESETS

__all__ = ["LLAMA_PRESETS", "AttentionKind", "ModelConfig", "check_field_types", "check_known_keys"]


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits type ``hint`` as a config file could give it (an int fits a
    float; a bool fits neither an int nor a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:  # the type here; which values, the owner's own check names
        return any(type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numpy's ints too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, tuple | list) and all(_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # other types (nested dataclasses) check themselves


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (tuple, list):
        return f"a list ({_describe(args[0])} each)"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # once per class: configs are made often


def check_field_types(obj: Any) -> None:
    """ValueError naming the first field of dataclass ``obj`` whose value does not fit
    its annotation (what a YAML file or a ``--set`` gives is checked before use)."""
    owner: Any = type(obj)  # classes are hashable; mypy types type(...) as not
    hints = _hints(owner)
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ValueError(
                f"{type(obj).__name__}: {f.name} must be {_describe(hints[f.name])}, got {value!r}"
            )


def check_known_keys(owner: str, given: Any, known: Any, *, prefix: str = "") -> None:
    """ValueError naming every key of ``given`` not in ``known``, each with the closest
    known key ("did you mean ...?") when there is one."""
    known = sorted(known)
    unknown = sorted({str(k) for k in given} - set(known))  # YAML keys may be 1, true, ...
    if not unknown:
        return
    hints, guessed = [], True
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        guessed = guessed and bool(close)
        hints.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
    message = f"{owner}: unknown key(s) {', '.join(hints)}"
    if not guessed:  # no guess for some key: list them all
        message += "; known: " + ", ".join(f"{prefix}{k}" for k in known)
    raise ValueError(message)


AttentionKind = Literal["mha", "moh", "goh"]
_ATTENTION_KINDS = ("mha", "moh", "goh")
# the fields only routers read (attention "moh" and "goh"), and only graph-routers ("goh")
ROUTER_FIELDS = (
    "num_shared",
    "top_k",
    "gate_convention",
    "hard_gates",
    "execution",
    "sparse_backend",
    "balance",
    "balance_rate",
    "task_embeddings",
)
GRAPH_FIELDS = (
    "graph",
    "graph_learnable",
    "graph_feature_dim",
    "graph_layers",
    "share_graph",
    "carry_head_states",
    "graph_conv",
    "graph_scale_init",
)


@dataclass(frozen=True)
class ModelConfig:
    """Configuration of :class:`DecoderOnlyLM` and :class:`Transformer`."""

    vocab_size: int  # number of token ids
    d_model: int = 64  # model width d
    num_heads: int = 4  # attention heads per layer h
    num_layers: int = 2  # layers (the encoder's, for the encoder-decoder model)
    d_ff: int = 256  # hidden width of the position-wise feed-forward network
    max_seq_len: int = 256  # longest sequence the positional encoding covers
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    attention: AttentionKind = "mha"  # "mha" dense, "moh" Mixture-of-Head, "goh" Graph-of-Heads
    num_decoder_layers: int | None = None  # encoder-decoder only; None = num_layers
    activation: Literal["relu", "gelu"] = "relu"  # FFN non-linearity (ReLU in the paper)
    norm_first: bool = False  # pre-LN; False = post-LN as in the paper
    layer_norm_eps: float = 1e-5  # epsilon of every layer norm
    tie_embeddings: bool = True  # share the token embedding with the output projection
    # --- Mixture-of-Head (attention="moh" or "goh") ---
    num_shared: int = 0  # always-on heads (the first num_shared heads)
    top_k: int | None = None  # routed heads each token uses; None = half of the routed heads
    gate_convention: Literal["reference", "paper"] = "reference"  # see graphheads.moh
    hard_gates: bool = False  # 0/1 gates with a straight-through estimator
    execution: Literal["auto", "dense", "sparse"] = "auto"  # see graphheads.execution
    sparse_backend: Literal["auto", "chunked", "flex"] = "auto"  # see graphheads.flex
    balance: Literal["aux_loss", "bias", "both"] = "aux_loss"  # how routed heads are balanced
    balance_rate: float = 1e-3  # bias step per optimiser step (balance "bias"/"both")
    # --- Graph-of-Heads (attention="goh") ---
    graph: str = "complete"  # head-graph preset: complete, ring, star, grid, empty
    graph_learnable: Literal["fixed", "edge", "dense"] = "edge"  # edge-weight parametrisation
    graph_feature_dim: int = 16  # node feature width F of the router
    graph_layers: int = 2  # message-passing layers L (0 = no message passing)
    share_graph: bool = False  # one head graph for all layers instead of one per layer
    carry_head_states: bool = False  # feed each layer's head states into the next router
    graph_conv: str = "gcn"  # message-passing layer: gcn, gatv2 (per token), lightgcn, graphconv
    graph_scale_init: float = 0.0  # initial weight of the graph branch (0: starts as MoH)
    task_embeddings: int = 0  # tasks with a learned embedding in every router's input
    # --- the block ---
    block: Literal["vaswani", "llama"] = "vaswani"  # llama: RMSNorm, SwiGLU, RoPE, pre-norm
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = all
    rope_theta: float = 10000.0  # rotary position base (block="llama")

    def __post_init__(self) -> None:
        check_field_types(self)
        positive = ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"ModelConfig: d_model ({self.d_model}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in _ATTENTION_KINDS:
            raise ValueError(
                f"ModelConfig: attention must be one of {_ATTENTION_KINDS}, got {self.attention!r}"
            )
        if self.activation not in ("relu", "gelu"):
            raise ValueError(
                f"ModelConfig: activation must be 'relu' or 'gelu', got {self.activation!r}"
            )
        if self.execution not in ("auto", "dense", "sparse"):
            raise ValueError(
                "ModelConfig: execution must be 'auto', 'dense' or 'sparse', "
                f"got {self.execution!r}"
            )
        if self.sparse_backend not in ("auto", "chunked", "flex"):
            raise ValueError(
                "ModelConfig: sparse_backend must be 'auto', 'chunked' or 'flex', "
                f"got {self.sparse_backend!r}"
            )
        if not isinstance(self.task_embeddings, int) or self.task_embeddings < 0:
            raise ValueError(
                f"ModelConfig: task_embeddings must be an int >= 0, got {self.task_embeddings!r}"
            )
        ignored = self.ignored_fields()
        if ignored:
            kind = "no router" if self.attention == "mha" else "no graph-router"
            settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in ignored)
            raise ValueError(
                f"ModelConfig: {settings} set, but attention={self.attention!r} has {kind}: "
                f"{'they' if len(ignored) > 1 else 'it'} would be ignored (leave "
                f"{'them' if len(ignored) > 1 else 'it'} at the default, or pick "
                f"attention {'moh or goh' if self.attention == 'mha' else 'goh'})"
            )
        if self.attention == "goh":  # else refused above when set (ignored)
            choices = {"graph": PRESETS, "graph_learnable": ("fixed", "edge", "dense"),
                       "graph_conv": CONVS}  # fmt: skip
            for key, names in choices.items():
                if getattr(self, key) not in names:
                    raise ValueError(
                        f"ModelConfig: {key} must be one of {list(names)}, "
                        f"got {getattr(self, key)!r}"
                    )
        if (
            self.attention == "goh"
            and self.graph_conv == "gatv2"
            and self.graph_learnable == "dense"
        ):
            raise ValueError(
                "ModelConfig: graph_conv='gatv2' takes its edges from the graph and a weight "
                "cannot switch one off, so graph_learnable='dense' (every pair an edge) would "
                "be the complete graph; use graph_learnable 'edge' or 'fixed'"
            )
        routed_sparse = self.execution == "sparse" and self.attention != "mha"
        if routed_sparse and self.sparse_backend == "flex" and self.dropout > 0:
            raise ValueError(
                f"ModelConfig: sparse_backend='flex' has no attention dropout, so training "
                f"with dropout={self.dropout} cannot run; use sparse_backend 'auto' or "
                "'chunked', or dropout=0"
            )
        if self.balance_rate < 0:
            raise ValueError(f"ModelConfig: balance_rate must be >= 0, got {self.balance_rate}")
        if self.balance not in ("aux_loss", "bias", "both"):
            raise ValueError(
                f"ModelConfig: balance must be 'aux_loss', 'bias' or 'both', got {self.balance!r}"
            )
        if self.block not in ("vaswani", "llama"):
            raise ValueError(f"ModelConfig: block must be 'vaswani' or 'llama', got {self.block!r}")
        kv = self.num_kv_heads
        if kv is not None and (not isinstance(kv, int) or kv < 1 or self.num_heads % kv):
            raise ValueError(
                f"ModelConfig: num_kv_heads ({kv!r}) must divide num_heads ({self.num_heads})"
            )
        if self.block == "llama" and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"ModelConfig: rotary positions need an even head width, got "
                f"d_model / num_heads = {self.d_model // self.num_heads}"
            )
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            raise ValueError(
                f"ModelConfig: num_decoder_layers must be positive, got {self.num_decoder_layers}"
            )
        if not isinstance(self.num_shared, int) or not 0 <= self.num_shared <= self.num_heads:
            raise ValueError(
                f"ModelConfig: num_shared ({self.num_shared!r}) must be an int in "
                f"[0, num_heads ({self.num_heads})]"
            )
        routed = self.num_heads - self.num_shared
        top_k = self.top_k
        if top_k is not None and (
            isinstance(top_k, bool)
            or not isinstance(top_k, int)
            or (routed > 0 and not 1 <= top_k <= routed)
            or (routed == 0 and top_k != 0)
        ):
            allowed = f"1..{routed}" if routed > 0 else "0"
            raise ValueError(
                f"ModelConfig: top_k ({top_k!r}) must be None (half of the routed heads) or "
                f"{allowed}: there are {routed} routed heads = num_heads ({self.num_heads}) - "
                f"num_shared ({self.num_shared})"
            )

    @property
    def routed_top_k(self) -> int:
        """``top_k`` with the default (``None`` = half of the routed heads, at least 1)
        resolved; 0 when every head is shared."""
        routed = self.num_heads - self.num_shared
        if self.top_k is None:
            return max(1, routed // 2) if routed > 0 else 0
        return self.top_k

    @classmethod
    def llama(cls, preset: str, vocab_size: int, **overrides: object) -> ModelConfig:
        """A Llama-style decoder (``block="llama"``, untied embeddings) of a named size:
        see :data:`LLAMA_PRESETS` (parameter counts in the docs); ``overrides`` replace
        any field (e.g. ``attention="goh"``)."""
        if preset not in LLAMA_PRESETS:
            raise ValueError(
                f"ModelConfig.llama: unknown preset {preset!r}; choose from {list(LLAMA_PRESETS)}"
            )
        values: dict[str, object] = {
            "vocab_size": vocab_size,
            "block": "llama",
            "tie_embeddings": False,
            "layer_norm_eps": 1e-6,
            **LLAMA_PRESETS[preset],
            **overrides,
        }
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ModelConfig:
        """Build a config from a plain dict; an unknown key raises ValueError naming it."""
        check_known_keys("ModelConfig", values, {f.name for f in fields(cls)})
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_saved(cls, values: dict[str, object]) -> ModelConfig:
        """:meth:`from_dict` for a config a checkpoint or a saved model holds
        (``dataclasses.asdict``): router and graph settings its attention kind ignores
        are dropped, so files written before they were refused still load."""
        unused = _unused_fields(str(values.get("attention", "mha")))
        return cls.from_dict({k: v for k, v in values.items() if k not in unused})

    def ignored_fields(self) -> list[str]:
        """The router and graph settings given away from their defaults that this
        ``attention`` kind never reads."""
        defaults = {f.name: f.default for f in fields(self)}
        return [k for k in _unused_fields(self.attention) if getattr(self, k) != defaults[k]]

    def with_overrides(self, **overrides: Any) -> ModelConfig:
        """This config with ``overrides`` (a run's ``model`` section) applied; where they
        change ``attention``, the settings the new kind ignores go back to their defaults
        unless the overrides set them to another value than this config's (a dense run
        from the GoH default model, or from the file ``graphheads config`` wrote), so only
        settings asked for are refused."""
        attention = str(overrides.get("attention", self.attention))
        defaults = {f.name: f.default for f in fields(self)}
        reset = {  # a setting equal to this config's own (a file `graphheads config` wrote)
            k: defaults[k]  # is not asked for either
            for k in _unused_fields(attention)
            if k not in overrides or overrides[k] == getattr(self, k)
        }
        return replace(self, **{**overrides, **reset})


# Llama-style sizes (width, depth, heads, key/value heads, SwiGLU width, context)
LLAMA_PRESETS: dict[str, dict[str, int]] = {
    "llama-10m": {
        "d_model": 320,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
        "d_ff": 864,
        "max_seq_len": 1024,
    },
    "llama-125m": {
        "d_model": 768,
        "num_layers": 12,
        "num_heads": 12,
        "num_kv_heads": 4,
        "d_ff": 2048,
        "max_seq_len": 2048,
    },
}


def model_keys() -> frozenset[str]:
    """The keys of :class:`ModelConfig`: what a run's ``model`` section may set."""
    return frozenset(f.name for f in fields(ModelConfig))


def _unused_fields(attention: str) -> tuple[str, ...]:
    """The :class:`ModelConfig` fields an ``attention`` kind never reads."""
    if attention == "mha":
        return ROUTER_FIELDS + GRAPH_FIELDS
    return GRAPH_FIELDS if attention == "moh" else ()
