"""Local transformers models in and converted models out: load a base model, save a
converted one (weights + the settings that rebuild its shapes), load it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphheads.graph import HeadGraph
from graphheads.integrations.hf.convert import convert_to_goh, converted_modules

__all__ = [
    "CONVERSION_FILE",
    "WEIGHTS_FILE",
    "conversion_settings",
    "load_converted",
    "load_pretrained",
    "save_converted",
]

CONVERSION_FILE = "graphheads_conversion.json"
WEIGHTS_FILE = "graphheads_model.safetensors"


def load_pretrained(path: str | Path) -> nn.Module:
    """A transformers model from a local folder: the causal-LM class when the config
    names one (``...ForCausalLM``/``...LMHeadModel``), else the bare model."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    loader = AutoModelForCausalLM if causal else AutoModel
    return loader.from_pretrained(path).eval()


def conversion_settings(model: nn.Module) -> dict[str, Any]:
    """The settings :func:`convert_to_goh` was called with, read off a converted model's
    routers: enough to convert the base model again into the same shapes (the head graph
    included), so that the converted weights load."""
    modules = converted_modules(model)
    if not modules:
        raise ValueError(f"conversion_settings: {type(model).__name__} is not converted")
    router = modules[0].router
    graph = router.graph
    return {
        "num_shared": router.num_shared,
        "top_k": router.top_k,
        "feature_dim": router.feature_dim,
        "num_layers": len(router.message_passing.layers),
        "graph": {
            "num_heads": graph.num_heads,
            "edge_index": graph.edge_index.tolist(),
            "learnable": graph.learnable,
            "num_shared": graph.num_shared,
        },
    }


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_converted(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model: str | Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the converted weights (safetensors) and the conversion settings (JSON) to
    ``out_dir``; :func:`load_converted` rebuilds the model from them and ``base_model``
    (the local folder the model was loaded from). ``extra`` is recorded beside the
    settings (e.g. tuning results). Each file is written to a temporary name first and
    renamed, so a folder never holds half a file."""
    from safetensors.torch import save_model

    settings = {
        "base_model": str(Path(base_model).resolve()),
        **conversion_settings(model),
        **(extra or {}),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / WEIGHTS_FILE, lambda p: save_model(model, str(p)))
    _write_atomically(out / CONVERSION_FILE, lambda p: p.write_text(json.dumps(settings, indent=2)))
    return out


def load_converted(out_dir: str | Path) -> nn.Module:
    """The model :func:`save_converted` wrote: base model, converted with the saved
    settings and head graph, then the converted weights."""
    from safetensors.torch import load_model

    out = Path(out_dir)
    if not (out / CONVERSION_FILE).exists():
        raise FileNotFoundError(f"no {CONVERSION_FILE} in {out}")
    settings = json.loads((out / CONVERSION_FILE).read_text())
    saved_graph = settings["graph"]
    graph = HeadGraph(
        saved_graph["num_heads"],
        torch.tensor(saved_graph["edge_index"], dtype=torch.long).reshape(2, -1),
        learnable=saved_graph["learnable"],
        num_shared=saved_graph["num_shared"],
    )
    model = load_pretrained(settings["base_model"])
    convert_to_goh(
        model,
        num_shared=settings["num_shared"],
        top_k=settings["top_k"],
        graph=graph,
        feature_dim=settings["feature_dim"],
        num_layers=settings["num_layers"],
    )
    load_model(model, str(out / WEIGHTS_FILE))  # edge weights, priors and all
    return model.eval()
