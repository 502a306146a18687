"""``graphheads.load``: a trained model in one line, from wherever it lives."""

from __future__ import annotations

import json
from pathlib import Path

from graphheads.hub import CONFIG_FILE, MODEL_TYPE, WEIGHTS_FILE, read_config, resolve_folder
from graphheads.train.checkpoint import CHECKPOINT_NAME
from graphheads.transformer import DecoderOnlyLM, Transformer

__all__ = ["load"]

ARCHITECTURES: dict[str, type[DecoderOnlyLM] | type[Transformer]] = {
    "DecoderOnlyLM": DecoderOnlyLM,
    "Transformer": Transformer,
}


def load(path: str | Path, *, device: str = "cpu") -> DecoderOnlyLM | Transformer:
    """The model at ``path``, in eval mode: a ``save_pretrained`` folder (``graphheads
    export``'s output; a Hub id with the ``hf`` extra), a ``graphheads train`` run folder
    (its latest checkpoint) or a checkpoint file."""
    local = Path(path).expanduser()
    if local.is_dir() and not _is_pretrained_folder(local) and (local / CONFIG_FILE).exists():
        if not (local / CHECKPOINT_NAME).exists():  # neither a model folder nor a run
            read_config(local)  # raises, naming what the folder lacks
    if local.is_file() or (local.is_dir() and not _is_pretrained_folder(local)):
        from graphheads.train.evaluation import load_run

        return load_run(local)[0].to(device)
    folder = resolve_folder(path)
    architectures = read_config(folder)["architectures"]
    name = architectures[0] if architectures else None
    if name not in ARCHITECTURES:
        raise ValueError(f"graphheads.load: {folder} holds an unknown architecture {name!r}")
    return ARCHITECTURES[name].from_pretrained(folder, device=device)


def _is_pretrained_folder(folder: Path) -> bool:
    """A ``save_pretrained`` folder (a run folder has a config.json of its own)."""
    config = folder / CONFIG_FILE
    if not config.is_file() or not (folder / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except json.JSONDecodeError:
        return False
