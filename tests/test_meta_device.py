"""Every accelerator path, checked without an accelerator: the models, a decoding step and
a trainer step run on PyTorch's ``meta`` device, which stands in for CUDA here. A meta
tensor has a shape and a device but no data, so any tensor made on the wrong device (a
CPU ``arange`` meeting a CUDA one) raises, and so does any host sync in the hot path
(``.item()``, ``.tolist()``, boolean indexing, ``int(tensor)``). Collectives are
recorded with the device of their tensors and their group: NCCL serves only CUDA
tensors, so a CPU tensor on the default (NCCL) group would crash the first multi-GPU
run; the only CPU collective, the stop flag's, goes through the trainer's gloo group.

What needs real kernels (equal numbers, NCCL itself, bf16 on CUDA) is checked by
``benchmarks/gpu_check.py`` when a GPU is at hand.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from test_train import SMALL as TRAIN_SMALL

import graphheads.routed
import graphheads.train.trainer as trainer_module
from graphheads import DecoderOnlyLM, ModelConfig, Transformer
from graphheads.train import RunConfig, Trainer
from graphheads.train.runtime import StopSignals

META = torch.device("meta")
KINDS = list(itertools.product(["mha", "moh", "goh"], ["vaswani", "llama"]))


def config(attention: str, block: str = "vaswani", **overrides) -> ModelConfig:
    values = {
        "vocab_size": 20,
        "d_model": 32,
        "num_heads": 4,
        "num_layers": 2,
        "max_seq_len": 16,
        "attention": attention,
        "block": block,
        **({"num_shared": 1, "top_k": 2} if attention != "mha" else {}),
        **overrides,
    }
    return ModelConfig(**values)


def on_meta(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=META)


@pytest.mark.parametrize(("attention", "block"), KINDS)
@pytest.mark.parametrize("model_type", ["lm", "seq2seq"])
def test_forward_and_backward_run_on_meta(attention, block, model_type):
    model_class = DecoderOnlyLM if model_type == "lm" else Transformer
    model = model_class(config(attention, block)).to(META)  # built on the CPU, then moved
    ids, padding = on_meta(2, 8), on_meta(2, 8, dtype=torch.bool)
    if model_type == "lm":
        out = model(ids, key_padding_mask=padding)
    else:
        out = model(ids, ids, src_key_padding_mask=padding, tgt_key_padding_mask=padding)
    assert out.logits.shape == (2, 8, 20) and out.logits.device == META
    assert len(out.routing) == (0 if attention == "mha" else 2 * (1 + 2 * (model_type != "lm")))
    (out.logits.sum() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing  # every parameter takes part in the loss


@pytest.mark.parametrize("attention", ["mha", "moh", "goh"])
def test_a_dense_decoding_step_runs_on_meta(attention):
    execution = {} if attention == "mha" else {"execution": "dense"}
    model = DecoderOnlyLM(config(attention, "llama", **execution)).to(META).eval()
    with torch.no_grad():
        cache = model.decoder.empty_cache(2, 12, device=META)
        out = model(on_meta(2, 4), cache=cache, use_cache=True)
        out = model(on_meta(2, 1), cache=out.cache, use_cache=True)
    assert out.logits.shape == (2, 1, 20) and out.cache is not None and out.cache[0].length == 5


@pytest.mark.parametrize("attention", ["moh", "goh"])
def test_a_routed_decoding_step_runs_on_meta(attention, count_calls):
    """The routed decoding kernel reads the active heads through index tensors (no
    ``.tolist()``), so a decoding step through it runs on ``meta`` tensors."""
    model = DecoderOnlyLM(config(attention, "llama")).to(META).eval()
    calls = count_calls(graphheads.routed, "routed_decode_attention")
    with torch.no_grad():
        cache = model.decoder.empty_cache(2, 12, device=META)
        out = model(on_meta(2, 4), cache=cache, use_cache=True)  # the prompt: dense
        for module in model.modules():
            if isinstance(module, graphheads.routed.RoutedAttention):
                module.execution = "sparse"  # one-token steps: the routed kernel
        out = model(on_meta(2, 1), cache=out.cache, use_cache=True)
    assert len(calls) == 2  # both layers' step went through the kernel
    assert out.logits.shape == (2, 1, 20) and out.logits.device == META
    assert out.cache is not None and out.cache[0].length == 5


SMALL = [*TRAIN_SMALL, "train.batch_size=8", "data.tasks=copy,reverse", "data.length=4"]


GLOO = "the trainer's gloo group"  # stands in for dist.new_group(backend="gloo")


@pytest.fixture
def meta_trainer(monkeypatch):
    """A trainer on the meta device that believes it is rank 0 of 2 (with its gloo group
    for CPU flags), whose collectives record their tensors' devices and their groups
    (and do nothing else)."""
    monkeypatch.setattr(trainer_module, "resolve_device", lambda name: META)
    calls: list[tuple[torch.device, object]] = []

    def all_reduce(tensor: torch.Tensor, op=None, group=None, async_op=False) -> None:
        calls.append((tensor.device, group))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)

    def make(*sets: str) -> tuple[Trainer, list[tuple[torch.device, object]]]:
        trainer = Trainer(RunConfig.load(None, [*SMALL, *sets]), None, progress=False)
        trainer.world_size = 2  # the step trains on rank 0's half of the batch
        trainer.cpu_group = GLOO  # what __init__ makes under torchrun on a GPU
        return trainer, calls

    return make


@pytest.mark.parametrize("model_type", ["lm", "seq2seq"])
@pytest.mark.parametrize("balance", ["aux_loss", "bias"])
@pytest.mark.parametrize("attention", ["moh", "goh"])
def test_a_trainer_step_runs_on_meta_with_its_collectives_on_the_device(
    meta_trainer, model_type, balance, attention
):
    trainer, calls = meta_trainer(
        f"train.model_type={model_type}", f"model.balance={balance}", f"model.attention={attention}"
    )
    metrics = trainer.train_step(trainer.data.sample(8, torch.Generator().manual_seed(0)))
    assert {v.device for v in metrics.values()} == {META}  # nothing read back yet
    # balance="bias": the head counts of every rank are summed (on the device, default
    # group) before the bias moves, so every rank takes the same step
    assert calls == ([(META, None)] if balance == "bias" else [])


def test_ranks_agree_to_stop_at_every_step_through_the_gloo_group(meta_trainer):
    """The stop flag is a CPU tensor (reading it waits for no device) on the gloo group:
    before, it went to the default group, which is NCCL on GPUs and refuses CPU tensors."""
    trainer, calls = meta_trainer()
    stop = StopSignals()
    assert not trainer._stop_requested(stop)
    assert calls == [(torch.device("cpu"), GLOO)]
