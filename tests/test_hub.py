"""graphheads' own models as Hugging Face-style folders (config.json + model.safetensors):
save_pretrained / from_pretrained / graphheads.load, `graphheads export`, and the round
trip from a trained run to a fresh process that loads and generates."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import graphheads
from graphheads import DecoderOnlyLM, HeadGraph, ModelConfig, Transformer

TINY = {"vocab_size": 20, "d_model": 32, "num_heads": 4, "d_ff": 64, "num_layers": 2,
        "max_seq_len": 16}  # fmt: skip


def perturbed(model):
    """Weights no fresh model has (trained edges, biases): a load must bring them."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("attention", ["goh", "moh", "mha"])
def test_a_saved_model_loads_back_equal_with_its_own_head_graph(tmp_path, attention):
    routing = {} if attention == "mha" else {"num_shared": 1, "top_k": 2}
    config = ModelConfig(**TINY, attention=attention, **routing, tie_embeddings=True)
    graph = HeadGraph.ring(4, learnable="edge") if attention == "goh" else None  # not the preset
    model = perturbed(DecoderOnlyLM(config, graph=graph))
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.safetensors"]  # fmt: skip
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "graphheads" and saved["architectures"] == ["DecoderOnlyLM"]
    umask = os.umask(0)
    os.umask(umask)  # safetensors writes private (0600) files: a shared folder needs the usual
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    loaded = DecoderOnlyLM.from_pretrained(tmp_path / "m")
    assert not loaded.training
    if attention == "goh":
        graphs = [m for m in loaded.modules() if isinstance(m, HeadGraph)]
        assert graphs[0].edge_index.tolist() == graph.edge_index.tolist()
    assert loaded.lm_head.weight is loaded.embed.token.weight  # still tied
    tokens = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert type(graphheads.load(tmp_path / "m")) is DecoderOnlyLM


def test_an_encoder_decoder_loads_back_and_the_wrong_class_is_named(tmp_path):
    model = perturbed(Transformer(ModelConfig(**TINY, attention="goh", num_shared=1, top_k=2)))
    model.save_pretrained(tmp_path / "t")
    src = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    loaded = graphheads.load(tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt).logits, model(src, tgt).logits)
    with pytest.raises(ValueError, match=r"holds a \['Transformer'\] model"):
        DecoderOnlyLM.from_pretrained(tmp_path / "t")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not a graphheads model folder"):
        DecoderOnlyLM.from_pretrained(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="nothing at"):
        graphheads.load(tmp_path / "nowhere" / "model")


def test_a_refused_save_leaves_the_folder_as_it_was(tmp_path):
    model = perturbed(DecoderOnlyLM(ModelConfig(**TINY)))
    model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(ValueError, match="extra must hold JSON values"):
        DecoderOnlyLM(ModelConfig(**TINY)).save_pretrained(tmp_path / "m", extra={"x": object()})
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


FRESH = """
import sys, torch, graphheads
model = graphheads.load(sys.argv[1])
prompt = torch.tensor([[int(x) for x in sys.argv[2].split()]])
print(model.generate(prompt, 6)[0].tolist())
"""


@pytest.mark.slow
def test_a_trained_run_exported_generates_the_same_tokens_in_a_fresh_process(tmp_path):
    """train (CLI) -> export (CLI) -> graphheads.load in a new Python -> generate: the
    tokens of the run's own model; the exported folder moved elsewhere still loads."""
    from graphheads.cli import main
    from graphheads.train import load_run

    sets = ["model.d_model=32", "model.num_heads=4", "model.num_shared=1", "model.top_k=2",
            "model.d_ff=64", "train.steps=20", "train.batch_size=8", "train.eval_batches=1",
            'data.tasks=["copy"]']  # fmt: skip
    argv = ["train", "--out", str(tmp_path / "run"), "--quiet", "--no-report"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 0
    saved = json.loads((tmp_path / "x" / "config.json").read_text())
    assert saved["step"] == 20 and saved["run_config"]["data"]["tasks"] == ["copy"]
    from_run = graphheads.load(tmp_path / "run")  # the run folder itself, in one line
    with pytest.raises(SystemExit):  # a run folder is not an export target
        main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "run")])
    shutil.move(tmp_path / "x", tmp_path / "elsewhere")  # no path inside points back
    model, _, data, _ = load_run(tmp_path / "run")
    prompt = data.sample(1, torch.Generator().manual_seed(0), task="copy").inputs[:, :4]
    expected = model.generate(prompt, 6)[0].tolist()
    assert from_run.generate(prompt, 6)[0].tolist() == expected
    words = " ".join(str(t) for t in prompt[0].tolist())
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "elsewhere"), words],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout.strip() == str(expected)


def test_node_labels_that_are_tuples_come_back_and_others_are_refused(tmp_path):
    import networkx as nx

    graph = HeadGraph.from_networkx(nx.grid_2d_graph(2, 2), learnable="edge")  # (r, c) labels
    config = ModelConfig(**TINY, attention="goh", num_shared=1, top_k=2)
    DecoderOnlyLM(config, graph=graph).save_pretrained(tmp_path / "m")
    loaded = graphheads.load(tmp_path / "m")
    assert (
        loaded.head_graphs()[0].node_labels == graph.node_labels == [(0, 0), (0, 1), (1, 0), (1, 1)]
    )
    odd = HeadGraph.ring(4, node_labels=[object()] * 4)
    with pytest.raises(ValueError, match="cannot be saved"):
        DecoderOnlyLM(config, graph=odd).save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"extra may not set \['graph'\]"):
        DecoderOnlyLM(config).save_pretrained(tmp_path / "x", extra={"graph": None})
    assert not (tmp_path / "odd").exists() and not (tmp_path / "x").exists()


def test_save_and_load_name_what_a_folder_is_and_refuse_other_files(tmp_path):
    """save_pretrained never writes over a run folder's or the user's own files; load
    says which forms it takes and points a converted HF folder to load_converted."""
    model = DecoderOnlyLM(ModelConfig(**TINY))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="holds other files"):
        model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "config.json").read_text() == '{"mine": 1}'
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["config.json"]
    model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")  # an earlier save of its own is replaced
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is not a save_pretrained folder .* run folder"):
        graphheads.load(tmp_path / "empty")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "bert", "graphheads": {}}')
    with pytest.raises(ValueError, match="load it with load_converted"):
        graphheads.load(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match=r"nothing at '\./runs/nowhere'"):
        graphheads.load("./runs/nowhere")  # a path, not a Hub id: no network call
