"""`graphheads convert --run`: a routed run from a trained run, which `train` continues
(issue 33). The oracle is the trained model itself: with every head on, the converted
model computes what it computed."""

import json

import pytest
import torch

from graphheads.cli import main
from graphheads.train import RunConfig, Trainer, load_checkpoint, load_run
from graphheads.train.conversion import convert_run

SMALL = {"d_model": 36, "num_heads": 6, "num_layers": 2, "d_ff": 48}


def trained_run(folder, attention="mha", steps=3, **model):
    routed = {"num_shared": 2, "top_k": 2} if attention != "mha" else {}
    config = RunConfig.from_dict(
        {
            "model": {**SMALL, "attention": attention, **routed, **model},
            "data": {"tasks": ["copy", "mqar"], "length": 6},
            "train": {"steps": steps, "batch_size": 8, "eval_every": steps, "eval_batches": 1,
                      "eval_batch_size": 8, "warmup_steps": 1, "lr": 1e-2},
        }
    )  # fmt: skip
    Trainer(config, folder, progress=False).fit()
    return folder


def logits(run, tokens):
    model, *_ = load_run(run)
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("dense") / "run")


@pytest.mark.parametrize("attention", ["mha", "moh", "goh"])
def test_with_every_head_on_the_converted_model_is_the_trained_one(dense, tmp_path, attention):
    routed = {} if attention == "mha" else {"num_shared": 2, "top_k": 4}  # every head on
    out = convert_run(dense, tmp_path / "conv", attention=attention, **routed)
    tokens = torch.randint(0, 20, (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(out, tokens), logits(dense, tokens), rtol=0, atol=1e-6)
    state = load_checkpoint(out)
    assert state["step"] == 0 and state["model_config"]["attention"] == attention
    assert json.loads((out / "converted_from.json").read_text())["step"] == 3


@pytest.mark.parametrize("attention", ["moh", "goh"])
def test_with_half_the_heads_each_token_keeps_its_own_heads_at_gates_near_one(
    dense, tmp_path, attention
):
    """Top-2 of 4 routed heads: the model differs from the trained one, but every gate
    starts within about 1% of 1, tokens choose different heads, and GoH starts as MoH."""
    out = convert_run(dense, tmp_path / "conv", attention=attention, num_shared=2, top_k=2)
    model, *_ = load_run(out)
    tokens = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(1))
    gates = torch.stack([r.gates for r in model(tokens).routing])  # (layers, b, t, h)
    kept = gates[gates > 0]
    assert kept.numel() == 2 * 2 * 9 * 4 and (kept - 1).abs().max() < 0.05
    chosen = {tuple((row > 0).tolist()) for row in gates.flatten(0, 2)}
    assert len(chosen) > 1  # not one static half of the heads for every token
    if attention == "goh":
        for router in model.modules():
            if hasattr(router, "graph_scale"):
                assert router.graph_scale.abs().max() == 0 and router.score_bias.abs().max() == 0


def test_an_moh_run_becomes_a_graph_router_that_routes_as_it_did(tmp_path):
    moh = trained_run(tmp_path / "moh", attention="moh")
    out = convert_run(moh, tmp_path / "goh", attention="goh", num_shared=2, top_k=2)
    tokens = torch.randint(0, 20, (2, 9))
    torch.testing.assert_close(logits(out, tokens), logits(moh, tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"num_shared=2.*not num_shared=1"):
        convert_run(moh, tmp_path / "other", attention="goh", num_shared=1, top_k=2)
    assert not (tmp_path / "other").exists()


def test_train_continues_the_converted_run_from_the_trained_weights(dense, tmp_path, capsys):
    out = tmp_path / "goh"
    main(["convert", "--run", str(dense), "--attention", "goh", "--num-shared", "2",
          "--top-k", "2", "--out", str(out), "--set", "train.steps=2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"graphheads train --config {out / 'run.json'} --out {out}" in printed
    config = RunConfig.load(out / "run.json")
    assert config.train.steps == 2 and config.model["attention"] == "goh"
    trainer = Trainer(config, out, progress=False)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state = trainer.check_resume()  # the converted checkpoint, at step 0
    assert state is not None and state["step"] == 0
    trainer._load_state(state)
    trained = load_checkpoint(dense)["model"]
    for key, value in trainer.model.state_dict().items():
        if ".router." not in key:
            torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    assert any(not torch.equal(start[k], trained[k]) for k in trained)  # not a fresh model
    result = Trainer(config, out, progress=False).fit()
    assert result.step == 2 and load_checkpoint(out)["step"] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention": "goh"}, "needs num_shared and top_k"),
        ({"attention": "mha", "num_shared": 2}, "--num-shared needs routed attention"),
        ({"attention": "gqa"}, "cannot convert attention 'mha' to 'gqa'"),
        ({"attention": "goh", "num_shared": 2, "top_k": 9}, "top_k"),
        ({"attention": "goh", "num_shared": 2, "top_k": 2, "overrides": ["model.num_layers=3"]},
         "differ in more than their routers"),
        ({"attention": "mha", "overrides": ["model.d_model=12"]},
         r"embed.token.weight has shape \(23, 36\) in the trained model and \(23, 12\)"),
    ],
)  # fmt: skip
def test_a_refused_conversion_writes_nothing(dense, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_run(dense, tmp_path / "conv", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_or_a_failed_write_is_left_as_it_was(dense, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert_run(dense, tmp_path / "full", attention="mha")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    import graphheads.train.conversion as conversion

    def broken(path, state):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(conversion, "save_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_run(dense, tmp_path / "new", attention="mha")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no half folder


def test_the_command_names_what_each_source_needs(dense, tmp_path, capsys):
    for argv, message in [
        (["--run", str(dense)], "--run needs --attention"),
        (["--model", "m"], "--model needs --text"),
        (["--model", "m", "--text", "t", "--num-shared", "1", "--top-k", "1",
          "--attention", "goh"], "--attention is for --run"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", *argv, "--out", str(tmp_path / "o")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
