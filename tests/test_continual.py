"""Continual learning: the accuracy matrix, its metrics, and the methods against forgetting."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from graphheads.data.tasks import TaskBatch, TaskSuite
from graphheads.train.checkpoint import CheckpointError, load_checkpoint
from graphheads.train.continual import ContinualConfig, Stage, continual_metrics
from graphheads.train.continual_run import ContinualRun
from graphheads.train.evaluation import evaluate
from graphheads.train.forgetting import EWC, HeadProtection, ReplayBuffer
from graphheads.transformer import DecoderOnlyLM


def config(method: str = "finetune", **overrides) -> ContinualConfig:
    values = {
        "method": method,
        "model": {"d_model": 32, "d_ff": 64},
        "eval_batches": 1,
        "eval_batch_size": 16,
        "batch_size": 16,
        "checkpoint_every": 10,
        "replay_size": 32,
        "fisher_samples": 4,
        "stages": [
            {"name": "a", "tasks": ["copy"], "steps": 20},
            {"name": "b", "tasks": ["reverse", "sort"], "steps": 20},
        ],
        **overrides,
    }
    return ContinualConfig.from_dict(values)


def test_accuracy_matrix_rows_equal_evaluations_of_the_model_at_each_point():
    run = ContinualRun(config(), progress=False)
    snapshots = []
    evaluate_row = run._evaluate

    def recording():
        snapshots.append(copy.deepcopy(run.model.state_dict()))
        return evaluate_row()

    run._evaluate = recording
    result = run.run()
    assert len(result.matrix) == 3 == len(snapshots)  # before, after a, after b
    model = DecoderOnlyLM(run.model_config)
    for row, state in zip(result.matrix, snapshots, strict=True):
        model.load_state_dict(state)
        again = evaluate(model, run.suite, batches=1, batch_size=16, seed=0)["accuracy"]
        assert row == [again[t] for t in result.tasks]
    assert result.matrix[0] != result.matrix[2]  # training moved the accuracies


def test_metrics_follow_their_formulas():
    stages = (Stage("a", ("copy",), 1), Stage("b", ("reverse",), 1), Stage("c", ("sort",), 1))
    matrix = [[0.1, 0.2, 0.3], [0.9, 0.25, 0.3], [0.6, 0.8, 0.35], [0.5, 0.7, 0.9]]
    metrics = continual_metrics(matrix, ("copy", "reverse", "sort"), stages)
    assert metrics["average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    # copy: 0.5 - 0.9 after its stage; reverse: 0.7 - 0.8
    assert metrics["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    # reverse before stage b (row 1) against row 0; sort before stage c (row 2)
    assert metrics["forward_transfer"] == pytest.approx(((0.25 - 0.2) + (0.35 - 0.3)) / 2)


def test_ewc_penalty_equals_its_formula():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    losses = [lambda: (model(x) - y).square().mean(), lambda: model(x).sum()]
    grads = []
    for loss_fn in losses:
        model.zero_grad()
        loss_fn().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    ewc = EWC()
    ewc.consolidate(model, losses)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    expected = 0.0
    for n, p in model.named_parameters():
        fisher = (grads[0][n] ** 2 + grads[1][n] ** 2) / 2
        expected += (fisher * (p - anchor[n]) ** 2).sum()
    torch.testing.assert_close(ewc.penalty(model, 3.0), 3.0 / 2 * expected)


def test_replay_batches_contain_earlier_stages_tasks():
    buffer = ReplayBuffer()
    old = TaskBatch(torch.ones(6, 5).long(), torch.ones(6, 5).long(), torch.zeros(6).long())
    buffer.add(old)
    new = TaskBatch(torch.full((8, 7), 2), torch.full((8, 7), 2), torch.ones(8).long())
    mixed = buffer.mix(new, 0.5, torch.Generator().manual_seed(0))
    assert mixed.task_ids.tolist() == [0] * 4 + [1] * 4
    assert mixed.inputs.shape == (8, 7) and bool(mixed.padding[:4, 5:].all())
    # in a run: after stage a (copy), stage b's batches hold copy rows too
    run = ContinualRun(config("replay"), progress=False)
    run.run(stop_after=21)  # stage a, then one step of stage b
    assert run.stage == 1 and len(run.replay) == 32
    stage_b = TaskSuite(("reverse", "sort"))
    batch = run._stage_batch(stage_b, [1, 2], 5)  # the run's ids of reverse and sort
    ids = batch.task_ids.tolist()
    assert ids[:8] == [0] * 8  # the replayed half: copy
    assert set(ids[8:]) <= {1, 2}


def test_protected_heads_do_not_change_and_others_do():
    run = ContinualRun(config("protect", protect_heads=2), progress=False)
    run.run(stop_after=20)  # stage a done: heads chosen from copy's usage
    assert run.stage == 1 and run.protection.slices
    before = copy.deepcopy(run.model.state_dict())
    run.run()  # stage b trains with them frozen
    after = run.model.state_dict()
    for name, dim, start, length, anchor in run.protection.slices:
        assert torch.equal(after[name].narrow(dim, start, length), anchor), name
    q = "decoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], before[q])  # the unprotected heads trained


def test_head_protection_penalty_and_its_choice_of_heads():
    from graphheads.train.forgetting import top_used_heads

    usage = [[[1.0, 1.0, 0.2, 0.9, 0.1, 0.5]], [[1.0, 1.0, 0.3, 0.8, 0.0, 0.6]]]
    assert top_used_heads(usage, num_shared=2, k=2) == [[3, 5]]
    run = ContinualRun(config("protect"), progress=False)
    protection = HeadProtection()
    protection.protect(run.model, [[3], [5]])
    with torch.no_grad():
        run.model.decoder.layers[0].self_attn.q_proj.weight.add_(1.0)
    e = run.model_config.d_model // run.model_config.num_heads
    # head 3 of layer 0: e query rows of width d_model changed by 1 each
    assert protection.penalty(run.model, 2.0).item() == pytest.approx(2.0 * e * 32)


def test_task_routing_trains_the_task_embeddings():
    run = ContinualRun(config("task_routing"), progress=False)
    assert run.model.task_embedding is not None and run.model.task_embedding.num_embeddings == 3
    run.run()
    assert run.model.task_embedding.weight.abs().sum() > 0  # zero at init


def test_resume_mid_stage_gives_the_uninterrupted_run(tmp_path):
    whole = ContinualRun(config("replay"), progress=False).run()
    first = ContinualRun(config("replay"), tmp_path, progress=False).run(stop_after=27)
    assert first.interrupted and len(first.matrix) == 2
    assert load_checkpoint(tmp_path)["step"] == 7  # mid stage b
    resumed = ContinualRun(config("replay"), tmp_path, progress=False).run()
    assert resumed.matrix == whole.matrix
    report = json.loads((tmp_path / "continual.json").read_text())
    assert report["accuracy_matrix"] == whole.matrix
    assert (tmp_path / "accuracy_matrix.png").exists() and (tmp_path / "head_usage.png").exists()
    other = ContinualRun(config("replay", lr=1e-4), tmp_path, progress=False)
    written = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="another continual configuration"):
        other.run()
    assert (tmp_path / "checkpoint.pt").read_bytes() == written


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"name": "x", "tasks": ["copy"]}, r"stage 1 \('x'\): missing key 'steps'"),
        ({"name": "x", "tasks": ["copy"], "steps": 0}, r"stage 1 \('x'\): key 'steps'"),
        ({"name": "x", "tasks": ["cpy"], "steps": 5}, r"stage 1 \('x'\): key 'tasks'.*'cpy'"),
        ({"name": "x", "tasks": "copy", "steps": 5}, r"stage 1 \('x'\): key 'tasks'"),
        (
            {"name": "x", "tasks": ["copy"], "step": 5},
            r"stage 1 \('x'\): unknown key\(s\) step \(did you mean steps\?\)",
        ),
    ],
)
def test_bad_stage_configs_name_the_stage_and_key(stage, message):
    good = {"name": "a", "tasks": ["copy"], "steps": 5}
    with pytest.raises(ValueError, match=message):
        ContinualConfig.from_dict({"stages": [good, stage]})


def test_bad_run_configs_are_named():
    with pytest.raises(ValueError, match="method"):
        config("distill")
    with pytest.raises(ValueError, match="unknown key"):
        config(replay=3)
    with pytest.raises(ValueError, match="stage names"):
        config(stages=[{"name": "a", "tasks": ["copy"], "steps": 1}] * 2)
    with pytest.raises(ValueError, match="routed heads"):
        ContinualRun(config("protect", model={"attention": "mha"}), progress=False)


def test_cli_continual_runs_and_refuses_bad_stages(tmp_path):
    path = tmp_path / "stages.json"
    path.write_text(json.dumps(config().to_dict()))
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "graphheads", "continual", "--config", str(path)]
    done = subprocess.run(
        [*cli, "--out", str(out), "--quiet"], capture_output=True, text=True, check=True
    )
    printed = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
    assert (
        printed["accuracy_matrix"]
        == json.loads((out / "continual.json").read_text())["accuracy_matrix"]
    )
    bad = config().to_dict()
    del bad["stages"][1]["steps"]
    path.write_text(json.dumps(bad))
    failed = subprocess.run([*cli, "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert failed.returncode == 2 and "stage 1 ('b'): missing key 'steps'" in failed.stderr
    assert not (tmp_path / "bad").exists()


def test_a_corpus_stage_is_a_column_of_next_token_accuracy(tmp_path):
    """A text stage after a task stage: its column is next-token accuracy on the corpus's
    held-out windows, recomputed here by hand from a snapshot of the model."""
    from graphheads.data.text import ByteTextDataset

    text = tmp_path / "notes.txt"
    text.write_text("the head graph routes tokens to heads. " * 60)
    run = ContinualRun(
        config(
            stages=[
                {"name": "a", "tasks": ["copy"], "steps": 10},
                {"name": "notes", "text": str(text), "steps": 15},
            ],
            seq_len=32,
        ),
        progress=False,
    )
    assert run.tasks == ("copy", "notes") and run.model_config.vocab_size == 256
    result = run.run()
    corpus = ByteTextDataset(text, seq_len=32)
    gen = torch.Generator().manual_seed(10**9)
    batch = corpus.sample(16, gen, split="val")
    with torch.no_grad():
        logits = run.model.eval()(batch.inputs).logits
    expected = (logits.argmax(-1) == batch.targets).float().mean().item()
    assert result.matrix[-1][1] == pytest.approx(expected)
    assert result.matrix[-1][1] > result.matrix[0][1]  # it learned the text
    assert len(result.head_usage[-1]["notes"]) == 2  # per layer


def test_corpus_stage_configs_are_checked(tmp_path):
    good = {"name": "a", "tasks": ["copy"], "steps": 5}
    with pytest.raises(ValueError, match=r"stage 1 \('t'\): give exactly one of"):
        ContinualConfig.from_dict(
            {"stages": [good, {"name": "t", "tasks": ["copy"], "text": "x", "steps": 5}]}
        )
    with pytest.raises(ValueError, match=r"stage 1 \('t'\): key 'text': .* does not exist"):
        ContinualConfig.from_dict(
            {"stages": [good, {"name": "t", "text": str(tmp_path / "none"), "steps": 5}]}
        )
    (tmp_path / "x.txt").write_text("text")
    with pytest.raises(ValueError, match="rename"):
        ContinualConfig.from_dict(
            {"stages": [good, {"name": "sort", "text": str(tmp_path / "x.txt"), "steps": 5}]}
        )


def test_ewc_fisher_is_that_of_the_task_loss_alone(monkeypatch):
    """EWC's Fisher measures how the model's predictions depend on each weight: the
    squared gradients of the cross-entropy, not of the load-balance term added in
    training (which it included before)."""
    import torch.nn.functional as F

    from graphheads.data.tasks import IGNORE_INDEX
    from graphheads.train.evaluation import forward_batch

    run = ContinualRun(config("ewc"), progress=False)
    seen = []
    monkeypatch.setattr(run.ewc, "consolidate", lambda model, losses: seen.extend(losses))
    run.run(stop_after=20)  # stage a, then its consolidation
    assert len(seen) == 4
    for loss_fn in seen:
        batch = loss_fn.args[0]
        out, targets = forward_batch(run.model, batch)
        ce = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        assert out.aux_loss is not None and float(out.aux_loss) > 0  # a term there is to drop
        torch.testing.assert_close(loss_fn(), ce)
