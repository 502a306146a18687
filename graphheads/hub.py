"""Hugging Face Hub-style folders for graphheads' own models: ``config.json`` (the
:class:`~graphheads.config.ModelConfig`, the head graph the model was built with, and
anything the caller adds, e.g. the training run's settings) and ``model.safetensors``
(weights; no pickle). The layout is the one ``huggingface_hub`` uploads and downloads, so
a folder can be pushed with ``huggingface_hub.upload_folder`` and loaded from a Hub id
when ``huggingface_hub`` is installed (the ``hf`` extra).

Each file is written under a temporary name and renamed, weights first and config last:
a folder never holds half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from graphheads.config import ModelConfig
from graphheads.graph import HeadGraph

__all__ = ["CONFIG_FILE", "MODEL_TYPE", "WEIGHTS_FILE", "HubMixin", "graph_from_spec", "graph_spec"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "graphheads"

M = TypeVar("M", bound="HubMixin")


def _label(value: Any) -> Any:
    """A node label as JSON: scalars as they are, tuples (grid coordinates) as lists."""
    if isinstance(value, str | int | float):
        return value
    if isinstance(value, tuple) and all(isinstance(x, str | int | float) for x in value):
        return list(value)
    raise ValueError(
        f"graph_spec: node label {value!r} cannot be saved (str, int, float or a tuple of "
        "them); relabel the graph's nodes first"
    )


def graph_spec(graph: HeadGraph) -> dict[str, Any]:
    """What rebuilds ``graph``'s shapes (its weights travel with the model's):
    :func:`graph_from_spec` is the inverse."""
    labels = graph.node_labels
    return {
        "num_heads": graph.num_heads,
        "edge_index": graph.edge_index.tolist(),
        "learnable": graph.learnable,
        "num_shared": graph.num_shared,
        "node_labels": None if labels is None else [_label(x) for x in labels],
    }


def graph_from_spec(spec: dict[str, Any]) -> HeadGraph:
    """The head graph :func:`graph_spec` describes (initial weights; load the model's)."""
    return HeadGraph(
        spec["num_heads"],
        torch.tensor(spec["edge_index"], dtype=torch.long).reshape(2, -1),
        learnable=spec["learnable"],
        num_shared=spec["num_shared"],
        node_labels=[tuple(x) if isinstance(x, list) else x for x in labels]
        if (labels := spec.get("node_labels")) is not None
        else None,
    )


def _umask() -> int:
    """The process's umask, read without setting it (setting it, even for a moment,
    would race with other threads creating files) where Linux shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # elsewhere: the only portable way to read it
    os.umask(umask)
    return umask


def usual_mode(path: Path) -> None:
    """Give ``path`` (and, for a folder, all it holds) the mode a plain ``open`` or
    ``mkdir`` gives under the process's umask: temporary files and folders (safetensors'
    own, ``mkdtemp``) are private (0600/0700), which a shared model folder must not be."""
    umask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never part of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_pretrained_folder(folder: Path) -> bool:
    """A :meth:`HubMixin.save_pretrained` folder (a run folder has a config.json too)."""
    config = folder / CONFIG_FILE
    if not config.is_file() or not (folder / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except json.JSONDecodeError:
        return False


def resolve_folder(path: str | Path) -> Path:
    """A local folder, or a Hub id downloaded (or found in the cache) by huggingface_hub;
    FileNotFoundError naming ``path`` when it is neither."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"from_pretrained: {str(path)!r} is not a folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(
            f"from_pretrained: {str(path)!r} is not a local folder, and loading a Hub id "
            "needs huggingface_hub (the 'hf' extra)"
        ) from err
    try:
        return Path(snapshot_download(str(path)))
    except Exception as err:  # offline, unknown id, ...: say which id failed
        raise FileNotFoundError(
            f"from_pretrained: {str(path)!r} is not a local folder and the Hub did not give it "
            f"({type(err).__name__}: {err})"
        ) from err


class HubMixin(nn.Module):
    """``save_pretrained`` / ``from_pretrained`` for models built as
    ``cls(config: ModelConfig, *, graph: HeadGraph | None)``."""

    config: ModelConfig

    def save_pretrained(
        self, save_directory: str | Path, *, extra: dict[str, Any] | None = None
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``save_directory`` (made if
        needed; files of an earlier save are replaced). ``extra`` entries are recorded in
        ``config.json`` beside the model's (JSON values). Returns the folder."""
        from safetensors.torch import save_model

        reserved = {"model_type", "architectures", "graphheads_version", "model_config", "graph"}
        clash = sorted(reserved & set(extra or {}))
        if clash:
            raise ValueError(f"save_pretrained: extra may not set {clash} (the model's own)")
        graphs = [m for m in self.modules() if isinstance(m, HeadGraph)]
        config = {
            "model_type": MODEL_TYPE,
            "architectures": [type(self).__name__],
            "graphheads_version": _version(),
            "model_config": asdict(self.config),
            "graph": graph_spec(graphs[0]) if graphs else None,
            **(extra or {}),
        }
        try:  # before anything is written: JSON or refused
            text = json.dumps(config, indent=2)
        except (TypeError, ValueError) as err:
            raise ValueError(f"save_pretrained: extra must hold JSON values ({err})") from err
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"save_pretrained: {out} is a file, not a folder")
        if out.is_dir() and any(out.iterdir()) and not is_pretrained_folder(out):
            raise ValueError(
                f"save_pretrained: {out} holds other files (a run folder, or your own); "
                "write the model to a new or empty folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{WEIGHTS_FILE}.tmp"
        try:
            save_model(self, str(tmp))  # shared (tied) weights stored once
            usual_mode(tmp)
            os.replace(tmp, out / WEIGHTS_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        write_atomically(out / CONFIG_FILE, text.encode())
        return out

    @classmethod
    def from_pretrained(cls: type[M], path: str | Path, *, device: str | torch.device = "cpu") -> M:
        """The model a :meth:`save_pretrained` folder (or a Hub id) holds, in eval mode.
        ValueError when the folder holds another architecture or no graphheads model."""
        from safetensors.torch import load_model

        folder = resolve_folder(path)
        config = read_config(folder)
        if config["architectures"] != [cls.__name__]:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: {folder} holds a {config['architectures']} "
                f"model; load it with graphheads.load({str(path)!r})"
            )
        spec = config.get("graph")
        model = cls(
            ModelConfig.from_saved(config["model_config"]),
            graph=graph_from_spec(spec) if spec else None,
        )
        load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
        return model.to(device).eval()


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a graphheads model folder; ValueError when it is not one."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: no {CONFIG_FILE} in {folder}")
    config = json.loads(path.read_text())
    if config.get("model_type") != MODEL_TYPE or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"from_pretrained: {folder} is not a graphheads model folder (model_type "
            f"{config.get('model_type')!r}; needs {MODEL_TYPE!r} and {WEIGHTS_FILE})"
        )
    return config


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graphheads")
    except PackageNotFoundError:
        return "unknown"
