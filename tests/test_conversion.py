"""`graphheads convert --run`: a routed run from a trained run, which `train` continues
(issue 33). The oracle is the trained model itself: with every head on, the converted
model computes what it computed."""

import json
import os

import pytest
import torch

from graphheads.cli import main
from graphheads.goh import GraphRouter, routers_of
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
                      "eval_batch_size": 8, "warmup_steps": 1, "lr": 3e-2},
        }
    )  # fmt: skip
    Trainer(config, folder, progress=False).fit()
    return folder


def forward(run, tokens):
    model, *_ = load_run(run)
    with torch.no_grad():
        return model(tokens)


def tokens(seed=0):
    return torch.randint(0, 20, (3, 11), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("dense") / "run")


@pytest.mark.parametrize(
    ("attention", "model", "overrides"),
    [("mha", {}, []), ("moh", {}, []), ("goh", {}, []),
     ("goh", {"block": "llama", "num_kv_heads": 2}, []),
     ("goh", {}, ["model.balance=bias", "model.hard_gates=true", "model.graph=ring"])],
)  # fmt: skip
def test_with_every_head_on_the_converted_model_is_the_trained_one(
    tmp_path, attention, model, overrides
):
    source = trained_run(tmp_path / "dense", **model)
    routed = {} if attention == "mha" else {"num_shared": 2, "top_k": 4}  # every head on
    out = convert_run(source, tmp_path / "conv", attention=attention, overrides=overrides, **routed)
    torch.testing.assert_close(
        forward(out, tokens()).logits, forward(source, tokens()).logits, rtol=0, atol=1e-6
    )
    state = load_checkpoint(out)
    assert state["step"] == 0 and state["model_config"]["attention"] == attention
    record = json.loads((out / "converted_from.json").read_text())
    assert record["step"] == 3 and record["run"] == str(source.resolve())


def test_with_half_the_heads_moh_and_goh_start_alike_with_gates_near_one(dense, tmp_path):
    """Top-2 of 4 routed heads: the model differs from the trained one, but every gate
    starts within about 1% of 1, tokens choose different heads, and GoH starts with
    MoH's routing (the same heads for every token, graph scale and prior at 0)."""
    chosen = {}
    for attention in ("moh", "goh"):
        out = convert_run(dense, tmp_path / attention, attention=attention, num_shared=2, top_k=2)
        gates = torch.stack([r.gates for r in forward(out, tokens(1)).routing])  # (l, b, t, h)
        kept = gates[gates > 0]
        assert kept.numel() == 2 * 3 * 11 * 4 and (kept - 1).abs().max() < 0.02
        chosen[attention] = gates > 0
        assert len({tuple(row.tolist()) for row in chosen[attention].flatten(0, 2)}) > 1
    assert torch.equal(chosen["moh"], chosen["goh"])
    model, *_ = load_run(tmp_path / "goh")
    for router in routers_of(model):
        assert isinstance(router, GraphRouter)
        assert router.graph_scale.abs().max() == 0 and router.score_bias.abs().max() == 0


@pytest.mark.parametrize("balance", ["aux_loss", "bias"])
def test_an_moh_run_becomes_a_graph_router_that_routes_as_it_did(tmp_path, balance):
    moh = trained_run(tmp_path / "moh", attention="moh", steps=6, balance=balance)
    if balance == "bias":  # the trained selection biases moved, and are kept
        assert any(r.selection_bias.abs().max() > 0 for r in routers_of(load_run(moh)[0]))
    out = convert_run(moh, tmp_path / "goh", attention="goh", num_shared=2, top_k=2)
    ours, theirs = forward(out, tokens()), forward(moh, tokens())
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"num_shared=2.*not num_shared=1"):
        convert_run(moh, tmp_path / "other", attention="goh", num_shared=1, top_k=2)
    assert not (tmp_path / "other").exists()
    again = convert_run(moh, tmp_path / "own", attention="goh")  # its own shared heads, top-k
    assert load_checkpoint(again)["model_config"]["top_k"] == 2


def test_an_moh_run_may_take_up_the_balance_bias(tmp_path):
    moh = trained_run(tmp_path / "moh", attention="moh")
    out = convert_run(moh, tmp_path / "moh_bias", attention="moh", num_shared=2, top_k=2,
                      overrides=["model.balance=bias"])  # fmt: skip
    torch.testing.assert_close(forward(out, tokens()).logits, forward(moh, tokens()).logits)
    assert all(r.selection_bias.abs().max() == 0 for r in routers_of(load_run(out)[0]))


def test_train_continues_the_converted_run_from_the_trained_weights(dense, tmp_path, capsys):
    out = tmp_path / "goh"
    main(["convert", "--run", str(dense), "--attention", "goh", "--num-shared", "2",
          "--top-k", "2", "--out", str(out), "--set", "train.steps=2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"graphheads train --config {out / 'run.json'} --out {out}" in printed
    with pytest.raises(SystemExit):  # a report before training says why there is none
        main(["report", "--run", str(out)])
    assert "the run has not trained yet" in capsys.readouterr().err
    main(["convert", "--run", str(dense), "--attention", "moh", "--num-shared", "2",
          "--top-k", "2", "--out", str(tmp_path / "q"), "--quiet"])  # fmt: skip
    assert capsys.readouterr().out == "" and (tmp_path / "q" / "run.json").exists()
    assert main(["train", "--config", str(out / "run.json"), "--out", str(out), "--quiet",
                 "--no-report"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["step"] == 2
    trained = load_checkpoint(dense)["model"]
    continued = load_checkpoint(out)["model"]
    fresh = Trainer(RunConfig.load(out / "run.json"), None, progress=False).model.state_dict()
    for key in ("embed.token.weight", "decoder.layers.0.self_attn.q_proj.weight"):
        # two small steps from the trained weights, far from a fresh model's
        near = (continued[key] - trained[key]).abs().max()
        assert near < 0.1 < (continued[key] - fresh[key]).abs().max()
    for argv, message in [  # --restart would drop the conversion; no --config: its settings
        (["--config", str(out / "run.json"), "--restart"], "convert again"),
        ([], f"continue it with its own: graphheads train --config {out / 'run.json'}"),
        # its own settings and one that cannot change: named
        (["--config", str(out / "run.json"), "--set", "train.lr=0.5"], "(changed: train.lr)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--out", str(out), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert load_checkpoint(out)["step"] == 2
    # the run folder's config.json is a config file too (its run settings)
    assert RunConfig.load(out / "config.json") == RunConfig.load(out / "run.json")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention": "goh"}, "needs --num-shared and --top-k"),
        ({"attention": "mha", "num_shared": 2}, "--num-shared needs routed attention"),
        ({"attention": "gqa"}, "cannot convert attention 'mha' to 'gqa'; conversions: mha to goh"),
        ({"attention": "goh", "num_shared": 2, "top_k": 9}, r"top_k \(9\) must be None .* or 1..4"),
        ({"attention": "goh", "num_shared": 2, "top_k": 2, "overrides": ["model.num_layers=3"]},
         r"model.num_layers would change what the trained weights compute"),
        ({"attention": "mha", "overrides": ["model.activation=gelu"]},
         r"model.activation would change"),
        ({"attention": "mha", "overrides": ["model.attention=goh"]},
         "give model.attention as --attention"),
        ({"attention": "goh", "num_shared": 2, "top_k": 2, "overrides": ["model.top_k=1"]},
         "give model.top_k as --top-k"),
        ({"attention": "goh", "num_shared": 2, "top_k": 4,
          "overrides": ["model.gate_convention=paper"]}, "gate_convention='paper'"),
        ({"attention": "goh", "num_shared": 2, "top_k": 4,
          "overrides": ["model.graph_scale_init=0.5"]}, "not graph_scale_init=0.5"),
        ({"attention": "mha", "overrides": "train.steps=2"}, "must be a list of settings"),
    ],
)  # fmt: skip
def test_a_refused_conversion_writes_nothing(dense, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_run(dense, tmp_path / "deep" / "conv", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_the_folder_is_whole_or_not_there(dense, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert_run(dense, tmp_path / "full", attention="mha")
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="exists and is not a folder"):
        convert_run(dense, tmp_path / "link", attention="mha")
    convert_run(dense, tmp_path / "empty", attention="mha")  # an empty folder is taken
    assert (tmp_path / "empty" / "run.json").exists()
    (tmp_path / "sibling").mkdir()  # permissions as the umask gives, not mkdtemp's 0700
    assert os.stat(tmp_path / "empty").st_mode == os.stat(tmp_path / "sibling").st_mode
    import graphheads.train.conversion as conversion

    def broken(path, state):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(conversion, "save_checkpoint", broken)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="disk full"):
        convert_run(dense, tmp_path / "a" / "b" / "new", attention="mha")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half folder, no parents


def test_the_command_names_what_each_source_needs(dense, tmp_path, capsys):
    for argv, message in [
        (["--run", str(dense)], "--run needs --attention"),
        (["--run", str(dense), "--attention", "mha", "--steps", "5"], "--steps is for --model"),
        (["--model", "m"], "--model needs --text"),
        (["--model", "m", "--text", "t", "--num-shared", "1", "--top-k", "1",
          "--attention", "goh"], "--attention is for --run"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", *argv, "--out", str(tmp_path / "o")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
