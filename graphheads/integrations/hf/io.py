"""Converted models as Hugging Face folders: save, share, load.

Two forms, both loaded by :func:`load_converted`:

- **full**: what ``model.save_pretrained(d)`` writes for a converted model (transformers'
  ``config.json``, which carries the conversion settings under ``"graphheads"``, and the
  weights, routers included), plus, from :func:`save_converted`, the base model's
  tokenizer. Self-contained: no path to the base model is needed or stored.
- **adapter-only** (``save_converted(..., adapter_only=True)``): the routers' and head
  graphs' weights (``graphheads_adapter.safetensors``, a few KB to MB) and
  ``graphheads_adapter.json`` (the settings, the model class and the base model's id or
  path, as given), like a PEFT adapter. Loading needs the base model.

transformers' own ``AutoModel.from_pretrained`` on a full folder gives the *unrouted*
base model (it reports the router weights as unexpected): load with
:func:`load_converted`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from graphheads.hub import graph_from_spec, usual_mode
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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def load_pretrained(
    path: str | Path, *, architecture: str | None = None, loading_info: bool = False
) -> Any:
    """A transformers model from a local folder (or a Hub id transformers can resolve), as
    the class its config names (``architectures[0]``, or ``architecture``), else the bare
    model. FileNotFoundError naming ``path`` when there is none. With ``loading_info``,
    ``(model, transformers' loading info)``."""
    import transformers

    local = Path(path).expanduser()
    looks_local = local.exists() or local.is_absolute() or str(path).startswith((".", "~"))
    if looks_local and not (local / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model folder at {str(path)!r} (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no transformers model at {str(path)!r} (a local folder with config.json, or a "
            f"Hub id in the local cache): {err}"
        ) from err
    name = architecture or next(iter(config.architectures or []), None)
    loader = getattr(transformers, name, None) if name else None
    if loader is None or not hasattr(loader, "from_pretrained"):
        loader = transformers.AutoModel
    model, info = loader.from_pretrained(path, output_loading_info=True)
    return (model.eval(), info) if loading_info else model.eval()


def _router_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a conversion adds: routers (with their head graphs) and head orders."""
    return {
        n: t
        for n, t in model.state_dict().items()
        if ".router." in f".{n}" or n.endswith("head_position")
    }


def _convert_as_saved(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    spec = settings.get("graph")
    return convert_to_goh(
        model,
        num_shared=settings["num_shared"],
        top_k=settings["top_k"],
        graph=graph_from_spec(spec) if spec is not None else None,
        feature_dim=settings["feature_dim"],
        graph_layers=settings.get("graph_layers", settings.get("num_layers")),  # 0.3: num_layers
    )


def _load_router_state(model: nn.Module, read: Any, source: Path) -> None:
    """The router tensors of ``model`` from ``read(names)`` (a dict of those found)."""
    expected = _router_state(model)
    tensors = read(set(expected))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"load_converted: {source} lacks router weights {missing[:3]}...")
    state = {n: tensors[n].to(expected[n].dtype) for n in expected}
    model.load_state_dict(state, strict=False)


def _safetensors_reader(files: list[Path]) -> Any:
    """Reads only the named tensors from the files (not the whole checkpoint again)."""
    from safetensors import safe_open

    def read(names: set[str]) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in names & set(handle.keys()):
                    found[name] = handle.get_tensor(name)
        return found

    return read


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformers folder (one file, or shards by an index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


def _is_converted_save(folder: Path) -> bool:
    """Whether ``folder`` holds a save of this module (any form), which a new save may
    replace whole."""
    if (folder / ADAPTER_CONFIG).exists() or (folder / LEGACY_CONFIG).exists():
        return True
    config = folder / "config.json"
    try:
        return config.is_file() and CONFIG_KEY in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


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
    weights, settings and model class beside ``base_model`` (required then: a Hub id or a
    path, stored as given). ``extra`` (JSON values, e.g. tuning results) is recorded with
    the settings under ``"extra"``.

    The folder is written beside ``out_dir`` and swapped in whole: an interrupted save
    leaves the old folder (or nothing), never a mix, and no file of an earlier save
    survives to be loaded instead. ``out_dir`` must be new, empty, or an earlier save.
    Returns it."""
    if adapter_only and base_model is None:
        raise ValueError("save_converted: adapter_only needs base_model (a Hub id or a path)")
    settings = {**conversion_settings(model), "extra": extra or {}}
    json.dumps(settings)  # JSON or refused, before anything is written
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_converted: {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not _is_converted_save(out):
        raise ValueError(f"save_converted: {out} holds other files; write to a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.saving-", dir=out.parent))
    try:
        if adapter_only:
            from safetensors.torch import save_file

            state = {n: t.contiguous() for n, t in _router_state(model).items()}
            save_file(state, str(stage / ADAPTER_WEIGHTS))
            adapter = {
                "base_model": str(base_model),
                "architecture": type(model).__name__,
                CONFIG_KEY: settings,
            }
            (stage / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2))
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
        usual_mode(stage)  # mkdtemp and safetensors make private files: the usual modes
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _copy_tokenizer(base_model: str | Path, folder: Path) -> None:
    """The base model's tokenizer into ``folder``, when it has one (a folder without
    tokenizer files gets none: transformers would make one up)."""
    from transformers import AutoTokenizer

    local = Path(base_model).expanduser()
    if (
        local.is_dir()
        and not any((local / n).exists() for n in TOKENIZER_FILES)
        and not any(local.glob("*.model"))
    ):
        return
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
    from safetensors.torch import load_model

    folder = Path(path)
    if (folder / ADAPTER_CONFIG).is_file():
        adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
        chosen = base or adapter["base_model"]
        model = _load_base(chosen, folder / ADAPTER_CONFIG, adapter.get("architecture"))
        try:
            _convert_as_saved(model, adapter[CONFIG_KEY])
        except ValueError as err:  # e.g. another head count than the adapter's
            graph = adapter[CONFIG_KEY].get("graph") or {}
            heads = f" with {graph['num_heads']} heads per layer" if "num_heads" in graph else ""
            raise ValueError(
                f"load_converted: the adapter in {folder} was made for a base{heads}; "
                f"{str(chosen)!r} does not fit it ({err})"
            ) from err
        reader = _safetensors_reader([folder / ADAPTER_WEIGHTS])
        _load_router_state(model, reader, folder / ADAPTER_WEIGHTS)
        return model.eval()
    if (folder / LEGACY_CONFIG).is_file():
        settings = json.loads((folder / LEGACY_CONFIG).read_text())
        model = _load_base(base or settings["base_model"], folder / LEGACY_CONFIG, None)
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
        hint = (
            "a graphheads model: load it with graphheads.load"
            if json.loads(config_file.read_text()).get("model_type") == "graphheads"
            else "convert it with convert_to_goh, then save_pretrained"
        )
        raise ValueError(
            f"load_converted: {config_file} has no {CONFIG_KEY!r} section: not a converted "
            f"model ({hint})"
        )
    model = _load_full(folder)
    _convert_as_saved(model, settings)
    _load_router_state(model, _safetensors_reader(_weight_files(folder)), folder)
    return model.eval()


def _load_full(folder: Path) -> nn.Module:
    """The base weights of a full folder, checked: every weight of the model found, and
    nothing unexpected but the router weights (loaded next). transformers' own report of
    those is silenced, as it would call them unexpected."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model, info = load_pretrained(folder, loading_info=True)
    finally:
        logging.set_verbosity(level)
    missing = list(info.get("missing_keys", []))
    unexpected = [
        n for n in info.get("unexpected_keys", [])
        if ".router." not in f".{n}" and not n.endswith("head_position")
    ]  # fmt: skip
    if missing or unexpected:
        raise ValueError(
            f"load_converted: {folder}'s weights do not fit {type(model).__name__}: missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    return model


def _load_base(base: str | Path, named_in: Path, architecture: str | None) -> Any:
    try:
        return load_pretrained(base, architecture=architecture)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"load_converted: the base model {str(base)!r} named in {named_in} was not found; "
            "pass load_converted(..., base=...) with its folder or Hub id"
        ) from err
