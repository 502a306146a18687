"""The trainer's devices, precision, compile and gradient accumulation."""

import copy

import pytest
import torch
from test_train import SMALL as TRAIN_SMALL

from graphheads import DecoderOnlyLM, ModelConfig
from graphheads.train import CheckpointError, RunConfig, Trainer, load_checkpoint, save_checkpoint
from graphheads.train.runtime import autocast, resolve_device

SMALL = [  # test_train's small model, with shorter tasks and per-step logs
    *TRAIN_SMALL,
    "data.tasks=copy,reverse",
    "data.length=4",
    "train.eval_batch_size=16",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.checkpoint_every=1000",
]


def run(*extra: str, steps: int = 4) -> tuple[Trainer, list[float]]:
    trainer = Trainer(
        RunConfig.load(None, [*SMALL, f"train.steps={steps}", *extra]), None, progress=False
    )
    losses = []
    for step in range(steps):
        batch = trainer.data.sample(16, torch.Generator().manual_seed(step))
        losses.append(trainer._read_metrics(trainer.train_step(batch))["loss"])
    return trainer, losses


def test_grad_accum_equals_the_whole_batch():
    _, whole_losses = run("train.aux_loss_weight=0")
    _, accum_losses = run("train.aux_loss_weight=0", "train.grad_accum=4")
    assert accum_losses == pytest.approx(whole_losses, rel=1e-5)
    whole, _ = run("train.aux_loss_weight=0", steps=1)  # the gradients of one step
    accum, _ = run("train.aux_loss_weight=0", "train.grad_accum=4", steps=1)
    for a, b in zip(accum.model.parameters(), whole.model.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(
        ValueError, match=r"divisible by the number of processes \(1\) x grad_accum \(3\)"
    ):
        run("train.grad_accum=3")


def test_bf16_trains_and_one_step_stays_close_to_fp32():
    _, fp32 = run(steps=1)
    _, bf16 = run("train.precision=bf16", steps=1)
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2)  # bf16 keeps ~3 significant digits
    _, losses = run("train.precision=bf16", steps=40)
    assert losses[-1] < 0.8 * losses[0]


def test_routing_stays_fp32_under_bf16_autocast():
    model = DecoderOnlyLM(
        ModelConfig(vocab_size=20, d_model=32, num_heads=4, attention="goh", num_shared=1, top_k=2)
    )
    with autocast("bf16", torch.device("cpu")):
        out = model(torch.randint(0, 20, (2, 6)))
    assert out.logits.dtype == torch.bfloat16
    routing = out.routing[0]
    assert routing.gates.dtype == routing.router_probs.dtype == torch.float32
    assert routing.load_balance_loss.dtype == torch.float32


@pytest.mark.parametrize("attention", ["moh", "goh"])
def test_router_logits_are_fp32_under_bf16_autocast(attention):
    """The router's projections run with autocast off: under bf16 autocast it chooses
    exactly the heads and gates it chooses in fp32 (before, its logits were rounded to
    bf16 and about 3 tokens in 1000 picked another top-k set)."""
    graph = {"graph_scale_init": 1.0} if attention == "goh" else {}
    config = ModelConfig(vocab_size=20, d_model=64, num_heads=8, attention=attention,
                         num_shared=2, top_k=3, **graph)  # fmt: skip
    router = DecoderOnlyLM(config).decoder.layers[0].self_attn.router
    x = torch.randn(4, 512, 64)
    fp32 = router(x)
    with autocast("bf16", torch.device("cpu")):
        mixed = router(x)
        bf16_input = router(x.bfloat16())  # what a bf16 residual stream hands it
    for out in (mixed, bf16_input):
        assert out.gates.dtype == out.router_probs.dtype == torch.float32
    torch.testing.assert_close(mixed.router_probs, fp32.router_probs, atol=0, rtol=0)
    assert torch.equal(mixed.routed_mask, fp32.routed_mask)
    assert torch.equal(bf16_input.routed_mask, router(x.bfloat16().float()).routed_mask)


def test_a_checkpoint_holds_the_cuda_generator_and_the_loss_scaler(monkeypatch):
    """Exact resume on a GPU: dropout there draws from the CUDA generator, fp16 training
    from the GradScaler's scale and growth tracker. A stand-in CUDA generator (this
    machine has none) and a CPU GradScaler carry the same state through the trainer."""
    trainer, _ = run(steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(256.0)  # as after an overflow: the scale halved
    trainer.scaler = scaler
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=None: restored.append(s))
    trainer.device = torch.device("cuda", 0)  # only the bookkeeping reads it here
    state = trainer.state()
    assert torch.equal(state["cuda_rng"], cuda_state)
    assert state["grad_scaler"]["scale"] == 256.0
    fresh, _ = run(steps=1)
    fresh.scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    fresh.device = torch.device("cuda", 0)
    fresh._load_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
    assert fresh.scaler.get_scale() == 256.0
    fresh.device = torch.device("cpu")  # a run resumed on the CPU leaves CUDA alone
    fresh._load_state(state)
    assert len(restored) == 1


@pytest.mark.slow
def test_compiled_and_eager_training_agree():
    _, eager = run(steps=3)
    _, compiled = run("train.compile=true", steps=3)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_devices_and_precisions_are_checked_by_name():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"train\.device 'gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"train\.device 'cuda': this machine has no CUDA"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match=r"'fp16' needs CUDA .* on cpu use 'bf16'"):
            run("train.precision=fp16")
    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or 'fp16', got 'fp8'"):
        RunConfig.load(None, ["train.precision=fp8"])


def test_cuda_without_an_index_names_this_process_gpu(monkeypatch):
    """``train.device=cuda`` must name a GPU: torch.cuda.set_device and DDP's device_ids
    refuse an index-less CUDA device (a stand-in CUDA here: the machine has none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun: the rank's own GPU
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # each rank sees its own
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_run_resumes_with_another_device_and_precision_and_old_checkpoints_load(tmp_path):
    config = RunConfig.load(None, [*SMALL, "train.steps=4"])
    Trainer(config, tmp_path, progress=False).fit()
    # a checkpoint written before these settings existed: its config lacks them
    state = load_checkpoint(tmp_path)
    for key in ("device", "precision", "compile", "grad_accum"):
        del state["run_config"]["train"][key]
    state["run_config"]["model"]["execution"] = "dense"  # 0.2's default; now "auto"
    state.pop("format")
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    more = RunConfig.load(
        None, [*SMALL, "train.steps=6", "train.device=cpu", "train.precision=bf16"]
    )
    assert Trainer(more, tmp_path, progress=False).fit().step == 6
    other = RunConfig.load(None, [*SMALL, "train.steps=8", "train.lr=0.1"])
    with pytest.raises(
        CheckpointError,
        match=r"changed: train.lr\).*Only train.steps, train.parallel, train.device",
    ):
        Trainer(copy.deepcopy(other), tmp_path, progress=False).fit()


def test_activation_checkpointing_gives_the_same_gradients():
    plain, plain_losses = run(steps=1)
    ckpt, ckpt_losses = run("train.activation_checkpointing=true", steps=1)
    assert ckpt.model.decoder.activation_checkpointing and ckpt_losses == pytest.approx(
        plain_losses
    )
    for a, b in zip(ckpt.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_model_flops_follow_palms_count_and_cpu_reports_no_utilisation():
    from graphheads.train.runtime import model_flops_per_token, peak_flops

    # 6 N + 12 L d T: 6 * 1e6 + 12 * 2 * 64 * 128
    assert model_flops_per_token(10**6, 2, 64, 128) == 6e6 + 196608
    assert peak_flops(torch.device("cpu"), "bf16") is None


def test_the_bias_update_follows_deepseek_v3s_rule():
    from graphheads.gates import update_balance_bias

    bias = torch.zeros(3)
    chosen = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32)
    load = update_balance_bias(bias, chosen, 0.1)  # loads 0.75, 0.25, 0.5; mean 0.5
    torch.testing.assert_close(load, torch.tensor([0.75, 0.25, 0.5]))
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0]))  # sign(mean - load)
    # the sign is taken on the exact loads, not on loads rounded to a bf16 bias's dtype
    from graphheads.gates import apply_balance_step

    half = torch.zeros(4, dtype=torch.bfloat16)
    counts = torch.tensor([2503.0, 2497.0, 2500.0, 2500.0, 10000.0], dtype=torch.float64)
    apply_balance_step(half, counts, 1.0)
    assert half.tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_the_selection_bias_picks_heads_but_gates_come_from_the_scores():
    from graphheads.gates import moh_gates

    logits = torch.tensor([[[2.0, 1.0, 0.0]]])  # (1, 1, 3) routed heads, top-1
    plain = moh_gates(logits, None, None, num_shared=0, top_k=1)
    biased = moh_gates(
        logits, None, None, num_shared=0, top_k=1, selection_bias=torch.tensor([0.0, 0.0, 1.0])
    )
    assert plain.top_k_indices.item() == 0 and biased.top_k_indices.item() == 2
    probs = logits.softmax(-1)
    torch.testing.assert_close(biased.router_probs, probs)  # unbiased probabilities
    assert biased.gates[0, 0, 2] > 0 and biased.gates[0, 0, :2].eq(0).all()


def head_load_spread(balance: str) -> float:
    """Mean over layers of the coefficient of variation of routed-head loads after 150
    steps without the auxiliary loss, on copy and sort."""
    sets = [
        "model.d_model=32", "model.num_heads=8", "model.num_shared=2", "model.top_k=2",
        "model.attention=moh", "train.batch_size=32", "train.aux_loss_weight=0",
        f"model.balance={balance}", "model.balance_rate=0.01", "data.tasks=copy,sort",
    ]  # fmt: skip
    trainer = Trainer(RunConfig.load(None, sets), None, progress=False)
    for step in range(150):
        trainer.train_step(trainer.data.sample(32, torch.Generator().manual_seed(step)))
    batch = trainer.data.sample(256, torch.Generator().manual_seed(999))
    with torch.no_grad():
        out = trainer.model.eval()(batch.inputs, key_padding_mask=batch.padding)
    loads = [r.routed_mask[~batch.padding].float().mean(0) for r in out.routing]
    return sum(float(load.std() / load.mean()) for load in loads) / len(loads)


@pytest.mark.slow
def test_bias_balancing_evens_out_head_loads_without_an_auxiliary_loss():
    none, bias = head_load_spread("aux_loss"), head_load_spread("bias")  # aux weight 0 in both
    assert bias < 0.5 * none, (bias, none)


def test_a_fused_optimizer_resumes_a_checkpoint_of_a_plain_one():
    """Loading replaces param groups: a fused AdamW (CUDA) resuming a checkpoint written by
    a plain one (CPU, an older run) kept the saved flags and broke fp16's GradScaler, which
    passes its scale only to fused kernels ("Expected grad_scale and found_inf to be
    None"). The optimizer keeps its own kernel choice."""
    from graphheads.train.checkpoint import full_state, load_full_state

    model = torch.nn.Linear(4, 2)
    plain = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    plain.step()
    state = full_state(model, plain)
    model.zero_grad(set_to_none=True)  # as a resuming run starts
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    load_full_state(model, fused, state)
    assert fused.param_groups[0]["fused"] is True
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    scaler.step(fused)  # raised before
    scaler.update()
    assert int(fused.state_dict()["state"][0]["step"]) == 2
