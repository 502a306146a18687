"""``graphheads.load``: a trained model in one line, from wherever it lives."""

from __future__ import annotations

from pathlib import Path

from graphheads.hub import CONFIG_FILE, read_config, resolve_folder
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
    if local.is_file() or (local.is_dir() and not (local / CONFIG_FILE).exists()):
        from graphheads.train.evaluation import load_run

        return load_run(local)[0].to(device)
    folder = resolve_folder(path)
    architectures = read_config(folder)["architectures"]
    name = architectures[0] if architectures else None
    if name not in ARCHITECTURES:
        raise ValueError(f"graphheads.load: {folder} holds an unknown architecture {name!r}")
    return ARCHITECTURES[name].from_pretrained(folder, device=device)
