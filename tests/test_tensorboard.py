"""train.log_to="tensorboard" (issue 30): TensorBoard holds what metrics.jsonl holds, head
usage as histograms over heads and head-graph images, and a resumed run leaves no
duplicate steps."""

import json

import pytest

from graphheads.train import RunConfig, Trainer
from graphheads.train.tensorboard import scalars

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SETTINGS = [
    "model.d_model=32",
    "model.num_heads=4",
    "model.num_shared=1",
    "model.top_k=2",
    "model.d_ff=64",
    "train.batch_size=8",
    "train.eval_batches=1",
    "train.eval_batch_size=16",
    "train.log_every=2",
    "train.eval_every=5",
    "train.checkpoint_every=5",
    "train.steps=10",
    "train.log_to=tensorboard",
    "data.tasks=copy,sort",
]


def events(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return acc


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_scalars_flatten_a_record_under_its_kind():
    record = {"kind": "eval", "step": 5, "loss": 1.5, "accuracy": {"copy": 0.5},
              "head_usage": {"copy": [[1.0]]}, "interrupted": False}  # fmt: skip
    assert dict(scalars(record)) == {"eval/loss": 1.5, "eval/accuracy/copy": 0.5}


def test_tensorboard_mirrors_the_metrics_and_a_resumed_run_purges_its_old_steps(
    tmp_path, monkeypatch
):
    run = tmp_path / "run"
    saves = []
    real_save = Trainer.save

    def save_only_at_5(self):  # an attempt that "crashed" after step 10's logs
        if self.step == 5:
            saves.append(self.step)
            real_save(self)

    monkeypatch.setattr(Trainer, "save", save_only_at_5)
    Trainer(RunConfig.load(None, SETTINGS), run, progress=False).fit()
    monkeypatch.setattr(Trainer, "save", real_save)
    Trainer(RunConfig.load(None, SETTINGS), run, progress=False).fit()  # resumes at 5
    assert saves == [5]
    lines = records(run)
    train = {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}
    assert sorted(train) == [2, 4, 6, 8, 10]  # metrics.jsonl: no duplicates
    acc = events(run)
    logged = acc.Scalars("train/loss")
    assert [e.step for e in logged] == [2, 4, 6, 8, 10]  # the first attempt's 6-10 purged
    assert [e.value for e in logged] == pytest.approx([train[s] for s in (2, 4, 6, 8, 10)])
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [e.step for e in acc.Scalars("eval/accuracy/sort")] == [r["step"] for r in evals]
    assert [e.value for e in acc.Scalars("eval/accuracy/sort")] == pytest.approx(
        [r["accuracy"]["sort"] for r in evals]
    )
    histogram = acc.Histograms("head_usage/copy/layer1")[-1]
    assert histogram.step == 10
    assert list(histogram.histogram_value.bucket) == pytest.approx(
        evals[-1]["head_usage"]["copy"][1]
    )  # one bucket per head: its usage
    images = acc.Images("head_graph/layer0")
    assert [i.step for i in images] == [5, 10] and images[-1].encoded_image_string[:4] == (
        b"\x89PNG"
    )


def test_a_missing_tensorboard_is_named_before_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'graphheads\[tensorboard\]'"):
        Trainer(RunConfig.load(None, SETTINGS), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_sharded_head_graphs_are_left_out_not_crashed_on(tmp_path):
    """Under FSDP every rank evaluates but only the main one writes: drawing a sharded
    graph's weights (DTensor .tolist()) raised on rank 0 and left the others waiting."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from graphheads import DecoderOnlyLM, ModelConfig
    from graphheads.train.tensorboard import TensorBoardLog

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = ModelConfig(vocab_size=10, d_model=16, num_heads=4, num_layers=1,
                             attention="goh", num_shared=1, top_k=2)  # fmt: skip
        model = DecoderOnlyLM(config)
        fully_shard(model)
        assert type(model.head_graphs()[0].raw_weight).__name__ == "DTensor"
        log = TensorBoardLog(tmp_path, model, first_step=1)
        log.write({"kind": "eval", "step": 1, "loss": 1.25})
        log.close()
    finally:
        dist.destroy_process_group()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("eval/loss")] == [1.25]
    assert acc.Tags()["images"] == []
