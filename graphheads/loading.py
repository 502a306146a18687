"""``graphheads.load``: a trained model in one line, from wherever it lives."""

from __future__ import annotations

import json
from pathlib import Path

from graphheads.hub import CONFIG_FILE, is_pretrained_folder, read_config, resolve_folder
from graphheads.train.checkpoint import CHECKPOINT_NAME
from graphheads.transformer import DecoderOnlyLM, Transformer

__all__ = ["load"]

ARCHITECTURES: dict[str, type[DecoderOnlyLM] | type[Transformer]] = {
    "DecoderOnlyLM": DecoderOnlyLM,
    "Transformer": Transformer,
}


FORMS = (
    "a save_pretrained folder (config.json + model.safetensors, `graphheads export`), "
    "a `graphheads train` run folder, or a checkpoint file"
)


def load(path: str | Path, *, device: str = "cpu") -> DecoderOnlyLM | Transformer:
    """The model at ``path``, in eval mode: a ``save_pretrained`` folder (``graphheads
    export``'s output; a Hub id with the ``hf`` extra), a ``graphheads train`` run folder
    (its latest checkpoint) or a checkpoint file. A converted Hugging Face model loads
    with :func:`graphheads.integrations.hf.load_converted`."""
    local = Path(path).expanduser()
    if local.is_file() or (local.is_dir() and (local / CHECKPOINT_NAME).exists()):
        from graphheads.train.evaluation import load_run

        return load_run(local)[0].to(device)
    if local.is_dir() and not is_pretrained_folder(local):
        hint = ""
        if _is_converted_hf_folder(local):
            hint = "; it holds a converted Hugging Face model: load it with load_converted"
        raise ValueError(f"graphheads.load: {local} is not {FORMS}{hint}")
    if not local.is_dir() and (local.exists() or not _looks_like_hub_id(str(path))):
        raise FileNotFoundError(f"graphheads.load: nothing at {str(path)!r} ({FORMS})")
    folder = resolve_folder(path)
    architectures = read_config(folder)["architectures"]
    name = architectures[0] if architectures else None
    if name not in ARCHITECTURES:
        raise ValueError(f"graphheads.load: {folder} holds an unknown architecture {name!r}")
    return ARCHITECTURES[name].from_pretrained(folder, device=device)


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name`` (one slash, not a relative or absolute path)."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def _is_converted_hf_folder(folder: Path) -> bool:
    if (folder / "graphheads_adapter.json").exists():
        return True
    try:
        return "graphheads" in json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
