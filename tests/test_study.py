"""The study runners of issue 33 (benchmarks/study.py, benchmarks/continued.py): what
they compute is what they say. Oracles: the model with the heads' outputs zeroed by a
hook, a parameter's value before training, records paired by hand."""

import pathlib
import sys

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import continued  # noqa: E402
import study  # noqa: E402

from graphheads.attention import MultiHeadAttention  # noqa: E402
from graphheads.goh import GraphRouter  # noqa: E402
from graphheads.train import RunConfig, Trainer  # noqa: E402


def record(variant, seed, metric, settings="a", group="g"):
    return {"variant": variant, "bench": "text", "heads": 8, "seed": seed, "steps": 10,
            "params": 1, "metric": metric, "curve": [[10, metric]], "settings": settings,
            "group": group}  # fmt: skip


def test_the_report_pairs_by_seed_and_never_mixes_settings():
    records = [record("MoH", s, 2.0 + 0.1 * s) for s in range(3)]
    # out of seed order, with a seed MoH lacks: pairs are made by seed, not position
    records += [record("GoH null", s, 1.9 + 0.1 * s + 0.01 * s) for s in (2, 0, 3, 1)]
    _, _, by, mixed = next(study.comparison_groups(records))
    assert mixed == [] and set(by) == {"MoH", "GoH null"}
    diffs = [by["GoH null"][s]["metric"] - by["MoH"][s]["metric"] for s in range(3)]
    mean, half, _ = study.paired(diffs)
    assert mean == pytest.approx(-0.09) and half > 0
    assert "-0.090 [" in study.report(records)
    # a rerun of MoH's seed 0 with other settings: MoH is left out, not paired
    rerun = [*records, record("MoH", 0, 9.0, settings="b")]
    _, _, by, mixed = next(study.comparison_groups(rerun))
    assert mixed == ["MoH"] and "MoH" not in by
    text = study.report(rerun)
    assert "9.0" not in text and "runs of several settings here: MoH" in text


def tiny_trainer(folder, variant):
    model = study.model_section(variant, 8, bench="mqar")
    config = RunConfig.from_dict(
        {
            "model": {**study.without_hooks(model), "d_model": 32, "d_ff": 32},
            "data": {"tasks": ["mqar"], "length": 4, "num_symbols": 16},
            "train": {"steps": 4, "batch_size": 4, "eval_every": 4, "eval_batches": 1,
                      "eval_batch_size": 4, "warmup_steps": 1, "lr": 3e-2},
        }
    )  # fmt: skip
    trainer = Trainer(config, folder, progress=False)
    study.apply_hooks(trainer.model, model)
    return trainer


@pytest.mark.parametrize("variant", ["GoH no bias", "GoH complete"])
def test_a_frozen_router_parameter_stays_as_it_was_through_training(tmp_path, variant):
    trainer = tiny_trainer(tmp_path, variant)
    routers = [m for m in trainer.model.modules() if isinstance(m, GraphRouter)]
    before = [r.score_bias.detach().clone() for r in routers]
    weights = [r.score.weight.detach().clone() for r in routers]
    trainer.fit()
    for router, bias, weight in zip(routers, before, weights, strict=True):
        # frozen in "GoH no bias"; the same training moves it in "GoH complete"
        assert torch.equal(router.score_bias, bias) == (variant == "GoH no bias")
        assert not torch.equal(router.score.weight, weight)  # the rest trains


def test_zero_readout_starts_the_readout_at_zero_and_the_scale_at_one(tmp_path):
    trainer = tiny_trainer(tmp_path, "GoH zero-u")
    routers = [m for m in trainer.model.modules() if isinstance(m, GraphRouter)]
    assert routers and all(r.score.weight.abs().sum() == 0 for r in routers)
    assert all(torch.equal(r.graph_scale, torch.ones_like(r.graph_scale)) for r in routers)


def test_masked_copy_equals_the_model_with_the_other_heads_outputs_zeroed():
    from graphheads.config import ModelConfig
    from graphheads.transformer import DecoderOnlyLM

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=20, max_seq_len=16, d_model=32, num_heads=4,
                         num_layers=2, d_ff=40, block="llama")  # fmt: skip
    model = DecoderOnlyLM(config).eval()
    keep = [[0, 3], [1, 2]]
    tokens = torch.randint(0, 20, (2, 9))
    with torch.no_grad():
        pruned = continued.masked_copy(model, keep)(tokens).logits
        attns = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]

        def zero_others(heads):
            def hook(_module, args):
                x = args[0].unflatten(-1, (4, 8)).clone()
                x[..., [h for h in range(4) if h not in heads], :] = 0
                return (x.flatten(-2),)

            return hook

        handles = [a.out_proj.register_forward_pre_hook(zero_others(k)) for a, k in
                   zip(attns, keep, strict=True)]  # fmt: skip
        oracle = model(tokens).logits
        for handle in handles:
            handle.remove()
        dense = model(tokens).logits
    torch.testing.assert_close(pruned, oracle)
    assert not torch.allclose(pruned, dense)


def test_recovery_is_read_per_seed_and_a_missing_control_is_not_never():
    def run(variant, seed, curve):
        return {"variant": variant, "seed": seed, "steps": 200, "metric": curve[-1][1],
                "curve": curve}  # fmt: skip

    records = [
        run("dense", 0, [[0, 2.0], [100, 2.1], [200, 1.9]]),
        run("dense", 1, [[0, 2.2], [100, 2.3], [200, 2.1]]),
        run("MoH 50%", 0, [[0, 4.0], [100, 2.5], [200, 1.99]]),
        run("MoH 50%", 1, [[0, 4.0], [100, 2.3], [200, 2.25]]),
        run("MoH 50%", 2, [[0, 4.0], [100, 2.3], [200, 2.25]]),
    ]
    row = next(line for line in continued.report(records, None, 1000).splitlines()
               if line.startswith("| MoH 50%"))  # fmt: skip
    assert "seed 0: 200k" in row  # 1.99 <= 2.0, the dense model at conversion
    assert "seed 1: not within 200k" in row  # 2.25 > 2.2
    assert "seed 2: n/a (no control)" in row


def test_a_run_stopped_by_a_signal_fails_instead_of_being_recorded(tmp_path, monkeypatch):
    import os
    import signal

    hooks = study.apply_hooks
    calls = []

    def interrupt_on_the_second_step(net, model):
        hooks(net, model)

        def send(*_):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the trainer stops at the step's end

        net.register_forward_pre_hook(send)

    monkeypatch.setattr(study, "apply_hooks", interrupt_on_the_second_step)
    spec = {"variant": "MoH", "bench": "mqar", "heads": 8, "steps": 6, "eval_every": 3,
            "d_ff": None, "work": str(tmp_path), "seed": 0}  # fmt: skip
    threads = torch.get_num_threads()  # run_one sets one thread, as in its worker
    try:
        with pytest.raises(SystemExit, match="interrupted by SIGINT after step 2"):
            study.run_one(spec)
    except KeyboardInterrupt:  # the trainer's handler was not installed: fail, not abort
        pytest.fail("the SIGINT reached the test: the trainer did not handle it")
    finally:
        torch.set_num_threads(threads)
