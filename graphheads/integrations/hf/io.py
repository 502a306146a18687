"""Converted models as Hugging Face folders: save, share, load.

Two forms, both loaded by :func:`load_converted`:

- **full**: what ``model.save_pretrained(d)`` writes for a converted model (transformers'
  ``config.json``, which carries the conversion settings under ``"graphheads"``, and the
  weights, routers included), plus, from :func:`save_converted`, the base model's
  tokenizer. Self-contained: no path to the base model is needed or stored.
- **adapter-only** (``save_converted(..., adapter_only=True)``): the routers' and head
  graphs' weights (``graphheads_adapter.safetensors``, a few KB to MB) and
  ``graphheads_adapter.json`` (the settings and the base model's id or path, as given),
  like a PEFT adapter. Loading needs the base model.

transformers' own ``AutoModel.from_pretrained`` on a full folder gives the *unrouted*
base model (it reports the router weights as unexpected): load with
:func:`load_converted`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from graphheads.hub import graph_from_spec
from graphheads.integrations.hf.convert import CONFIG_KEY, conversion_settings, convert_to_goh

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LEGACY_CONFIG",
    "load_converted",
    "load_pretrained",
    "save_converted",
]

ADAPTER_CONFIG = "graphheads_adapter.json"
ADAPTER_WEIGHTS = "graphheads_adapter.safetensors"
LEGACY_CONFIG = "graphheads_conversion.json"  # graphheads 0.2's format (absolute base path)
LEGACY_WEIGHTS = "graphheads_model.safetensors"


def load_pretrained(path: str | Path) -> nn.Module:
    """A transformers model from a local folder (or a Hub id transformers can resolve):
    the causal-LM class when the config names one (``...ForCausalLM``/``...LMHeadModel``),
    else the bare model. FileNotFoundError naming ``path`` when transformers cannot."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    local = Path(path).expanduser()
    looks_local = local.exists() or local.is_absolute() or str(path).startswith((".", "~"))
    if looks_local and not (local / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model folder at {str(path)!r} (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no transformers model at {str(path)!r} (a local folder with config.json, or a "
            f"Hub id in the local cache): {err}"
        ) from err
    architectures = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    loader = AutoModelForCausalLM if causal else AutoModel
    return loader.from_pretrained(path).eval()


def _router_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a conversion adds: routers (with their head graphs) and head orders."""
    return {
        n: t
        for n, t in model.state_dict().items()
        if ".router." in f".{n}" or n.endswith("head_position")
    }


def _convert_as_saved(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    return convert_to_goh(
        model,
        num_shared=settings["num_shared"],
        top_k=settings["top_k"],
        graph=graph_from_spec(settings["graph"]),
        feature_dim=settings["feature_dim"],
        num_layers=settings["num_layers"],
    )


def _load_router_state(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    expected = _router_state(model)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"load_converted: {source} lacks router weights {missing[:3]}...")
    state = {n: tensors[n].to(expected[n].dtype) for n in expected}
    model.load_state_dict(state, strict=False)


def _read_safetensors(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a transformers folder (one file, or shards with an index)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def save_converted(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model: str | Path | None = None,
    adapter_only: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write converted ``model`` to ``out_dir``: the full form (``save_pretrained``, plus
    ``base_model``'s tokenizer when it has one) or, with ``adapter_only``, the routers'
    weights and settings beside ``base_model`` (required then: a Hub id or a path, stored
    as given). ``extra`` (JSON values, e.g. tuning results) is recorded with the
    settings. The folder is written beside ``out_dir`` and then moved into place, file by
    file, its config last: an interrupted save never leaves half a file. Returns it."""
    settings = {**conversion_settings(model), **(extra or {})}
    if adapter_only and base_model is None:
        raise ValueError("save_converted: adapter_only needs base_model (a Hub id or a path)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as staging:
        stage = Path(staging)
        if adapter_only:
            from safetensors.torch import save_file

            state = {n: t.contiguous() for n, t in _router_state(model).items()}
            save_file(state, str(stage / ADAPTER_WEIGHTS))
            adapter = {"base_model": str(base_model), CONFIG_KEY: settings}
            (stage / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2))
            order = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
        else:
            config: Any = model.config
            recorded = getattr(config, CONFIG_KEY, None)
            setattr(config, CONFIG_KEY, settings)
            try:
                model.save_pretrained(stage)  # type: ignore[operator]
            finally:
                setattr(config, CONFIG_KEY, recorded)
            if base_model is not None:
                _copy_tokenizer(base_model, stage)
            order = sorted(p.name for p in stage.iterdir() if p.name != "config.json")
            order.append("config.json")
        for name in order:
            os.replace(stage / name, out / name)
    return out


def _copy_tokenizer(base_model: str | Path, folder: Path) -> None:
    """The base model's tokenizer into ``folder``, when it has one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError, TypeError):
        return  # no tokenizer there (a vision model, a bare checkpoint): nothing to copy
    tokenizer.save_pretrained(folder)


def load_converted(path: str | Path, *, base: str | Path | None = None) -> nn.Module:
    """The converted model saved at ``path`` (eval mode): a full folder (written by
    ``model.save_pretrained`` or :func:`save_converted`), an adapter-only folder (its
    base model from ``base`` if given, else the id or path it names), or a folder of
    graphheads 0.2 (``graphheads_conversion.json``; ``base`` overrides its path)."""
    from safetensors.torch import load_file, load_model

    folder = Path(path)
    if (folder / ADAPTER_CONFIG).is_file():
        adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
        model = _load_base(base or adapter["base_model"], folder / ADAPTER_CONFIG)
        _convert_as_saved(model, adapter[CONFIG_KEY])
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
        _load_router_state(model, tensors, folder / ADAPTER_WEIGHTS)
        return model.eval()
    if (folder / LEGACY_CONFIG).is_file():
        settings = json.loads((folder / LEGACY_CONFIG).read_text())
        model = _load_base(base or settings["base_model"], folder / LEGACY_CONFIG)
        _convert_as_saved(model, settings)
        load_model(model, str(folder / LEGACY_WEIGHTS))  # edge weights, priors and all
        return model.eval()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"load_converted: {folder} holds no converted model (no config.json, "
            f"{ADAPTER_CONFIG} or {LEGACY_CONFIG})"
        )
    settings = json.loads(config_file.read_text()).get(CONFIG_KEY)
    if settings is None:
        raise ValueError(
            f"load_converted: {config_file} has no {CONFIG_KEY!r} section: not a converted "
            "model (convert it with convert_to_goh, then save_pretrained)"
        )
    model = _quiet_load(folder)  # the base weights; ours are 'unexpected' to transformers
    _convert_as_saved(model, settings)
    _load_router_state(model, _read_safetensors(folder), folder)
    return model.eval()


def _load_base(base: str | Path, named_in: Path) -> nn.Module:
    try:
        return load_pretrained(base)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"load_converted: the base model {str(base)!r} named in {named_in} was not found; "
            "pass base=... (CLI: --base) with its folder or Hub id"
        ) from err


def _quiet_load(path: str | Path) -> nn.Module:
    """:func:`load_pretrained` without transformers' report of the router weights, which
    it does not know and we load next."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load_pretrained(path)
    finally:
        logging.set_verbosity(level)
