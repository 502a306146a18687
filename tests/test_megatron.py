"""graphheads inside Megatron-core (the ``megatron`` extra; CI installs it).

Oracles: graphheads' own DecoderOnlyLM / GoHAttention with the same weights (logits,
gradients, load-balance losses), and the tensor-parallel-1 run for tensor parallelism 2
(two gloo processes under torchrun)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core", reason="needs the megatron extra (megatron-core)")

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from graphheads import DecoderOnlyLM, GoHAttention, ModelConfig, MoHAttention
from graphheads.integrations.megatron import (
    AUX_LOSS_NAME,
    RoutedSelfAttention,
    build_gpt,
    check_megatron_config,
    copy_attention,
    goh_layer_spec,
    load_from_graphheads,
    load_into_graphheads,
    moh_layer_spec,
    pack_qkv,
    unpack_qkv,
)

# megatron-core's own notices on a CPU-only machine (no Apex, no Transformer Engine)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*(Apex|Transformer Engine).*:UserWarning"),
    pytest.mark.filterwarnings("ignore:full scope is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*tp_group is None:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:MLP requires ffn_hidden_size:DeprecationWarning"),
    # a plain forward and backward (no schedule) is one whole step
    pytest.mark.filterwarnings("ignore:graphheads.integrations.megatron.*calculator:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "megatron_worker.py"
EXAMPLE = ROOT / "examples" / "megatron_pretrain.py"


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1(tmp_path_factory):
    """One gloo process group of size 1 with Megatron's parallel state, for this module."""
    store = tmp_path_factory.mktemp("megatron") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def llama_config(attention: str, **overrides) -> ModelConfig:
    values = {
        "vocab_size": 64,
        "d_model": 32,
        "num_heads": 4,
        "num_kv_heads": 2,
        "num_layers": 2,
        "d_ff": 64,
        "max_seq_len": 32,
        "attention": attention,
        "num_shared": 1 if attention != "mha" else 0,
        "top_k": 2 if attention != "mha" else None,
        **({"graph_scale_init": 0.5} if attention == "goh" else {}),  # graph branch on
        **overrides,
    }
    return ModelConfig.llama("llama-10m", **values)


def tokens(b: int = 2, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(3))
    return ids, torch.arange(t).expand(b, -1)


@pytest.mark.parametrize("attention", ["mha", "moh", "goh"])
def test_gpt_equals_graphheads_lm_both_ways(attention):
    config = llama_config(attention)
    lm = DecoderOnlyLM(config).eval()
    gpt = build_gpt(config).eval()
    load_from_graphheads(gpt, lm)
    ids, positions = tokens()
    expected = lm(ids).logits
    torch.testing.assert_close(gpt(ids, positions, None), expected, atol=1e-5, rtol=1e-5)
    back = DecoderOnlyLM(config).eval()  # other random weights until loaded
    assert not torch.allclose(back(ids).logits, expected)
    load_into_graphheads(back, gpt)
    torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["moh", "goh"])
def test_training_gradients_and_load_balance_loss_match_graphheads(attention):
    """Forward and backward at TP 1: cross-entropy plus beta * the mean over layers of the
    load-balance loss (graphheads' trainer) gives Megatron's gradients, whose auxiliary
    loss enters through MoEAuxLossAutoScaler; the tracker logs every layer's loss."""
    beta = 0.5  # large, so a wrong scaling of the auxiliary loss would show
    config = llama_config(attention)
    lm = DecoderOnlyLM(config).train()
    gpt = build_gpt(config, load_balance_coeff=beta).train()
    load_from_graphheads(gpt, lm)
    ids, positions = tokens()
    labels = ids.roll(-1, dims=1)
    out = lm(ids)
    aux = out.aux_loss / len(out.routing)
    loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()) + beta * aux
    loss.backward()
    clear_aux_losses_tracker()
    gpt(ids, positions, None, labels=labels).mean().backward()
    logged = get_moe_layer_wise_logging_tracker()[AUX_LOSS_NAME]["values"]
    torch.testing.assert_close(logged, torch.stack([r.load_balance_loss for r in out.routing]))
    for block, layer in zip(lm.decoder.layers, gpt.decoder.layers, strict=True):
        ours, theirs = block.self_attn, layer.self_attention
        fused = pack_qkv(ours.q_proj.weight.grad, ours.k_proj.weight.grad,
                         ours.v_proj.weight.grad, 4, 2)  # fmt: skip
        torch.testing.assert_close(theirs.linear_qkv.weight.grad, fused, atol=1e-6, rtol=1e-4)
        router_grads = dict(theirs.router.named_parameters())
        for name, p in ours.router.named_parameters():
            torch.testing.assert_close(router_grads[name].grad, p.grad, atol=1e-6, rtol=1e-4)


def schedule_router_grads(
    micro_batches: int, loss_scale: float = 1.0, *, calculator: bool = True, per_token: bool = False
) -> dict[str, torch.Tensor]:
    """Router gradients of one training step of ``micro_batches`` identical micro-batches
    (so every count gives the same mean loss), driven through Megatron's own
    per-micro-batch functions (``forward_step``, whose ``forward_step_calc_loss`` divides
    the loss by the number of micro-batches, and ``backward_step``, which applies
    ``grad_scale_func``), in the loop of ``forward_backward_no_pipelining`` (which itself
    needs CUDA), then unscaled. With ``per_token`` (``calculate_per_token_loss``) the
    loss is the sum over tokens and the gradients are divided by the step's token count,
    as ``finalize_model_grads`` does."""
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )
    from megatron.core.pipeline_parallel.schedules import backward_step, forward_step

    torch.manual_seed(0)
    gpt = build_gpt(llama_config("goh"), load_balance_coeff=0.5).train()
    if loss_scale != 1.0:
        gpt.config.grad_scale_func = lambda loss: loss * loss_scale  # fp16's loss scaler
    gpt.config.calculate_per_token_loss = per_token
    rows = 2
    data = iter([tokens(b=rows)] * micro_batches)

    def forward_step_func(iterator, model):
        x, p = next(iterator)
        per_token = model(x, p, None, labels=x.roll(-1, dims=1))
        return per_token, lambda out: (out.sum(), torch.tensor(out.numel()), {})

    if calculator:  # Megatron-LM's training loop sets it up
        init_num_microbatches_calculator(0, None, rows * micro_batches, rows, 1)
    try:
        for _ in range(micro_batches):
            out, _ = forward_step(
                forward_step_func, data, gpt, micro_batches, None, [], gpt.config, 1
            )
            backward_step(None, out, None, None, gpt.config)
    finally:
        destroy_num_microbatches_calculator()
    count = rows * 12 * micro_batches if per_token else 1  # finalize_model_grads' division
    return {n: p.grad / loss_scale / count for n, p in gpt.named_parameters() if ".router." in n}


def test_head_loss_follows_megatrons_schedule_whatever_the_micro_batches_and_loss_scale():
    """beta * mean load-balance loss enters at the main loss's scale: the same router
    gradients with 1 or 4 identical micro-batches and under fp16-style loss scaling (megatron-core
    sets MoEAuxLossAutoScaler's scale only for models with experts: before, 4
    micro-batches gave the head loss 4 times its weight and a loss scale of 1024
    1/1024 of it)."""
    one = schedule_router_grads(1)
    others = (
        schedule_router_grads(4),
        schedule_router_grads(1, loss_scale=1024.0),
        schedule_router_grads(4, loss_scale=1024.0, per_token=True),
    )
    for other in others:
        assert other.keys() == one.keys()
        for name, grad in one.items():
            torch.testing.assert_close(other[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # the head loss does move the router gradients: at another weight they differ
    with pytest.warns(UserWarning, match="micro-batch calculator is not initialised"):
        without = schedule_router_grads(4, calculator=False)  # each micro-batch at weight 1
    assert any((without[n] - g).abs().max() > 1e-4 for n, g in one.items())


def test_pipeline_dtype_follows_the_precision():
    assert build_gpt(llama_config("goh")).config.pipeline_dtype == torch.float32
    gpt = build_gpt(llama_config("goh"), bf16=True, params_dtype=torch.bfloat16)
    assert gpt.config.pipeline_dtype == torch.bfloat16
    assert build_gpt(llama_config("goh"), fp16=True).config.pipeline_dtype == torch.float16


@pytest.mark.parametrize("kind", ["moh", "goh"])
def test_one_block_equals_graphheads_attention(kind):
    """A Megatron routed attention block (biases, GQA) == graphheads' attention with the
    same weights, outputs and input gradients; and the copy back gives the same block."""
    mc = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=8,
        num_query_groups=4,
        use_cpu_initialization=True,
        add_bias_linear=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if kind == "moh":
        spec = moh_layer_spec(2, 3)
        ours = MoHAttention(32, 8, 2, 3, num_kv_heads=4)
    else:
        spec = goh_layer_spec(2, 3, feature_dim=8, graph_layers=1, graph_scale_init=1.0)
        ours = GoHAttention(32, 8, 2, 3, num_kv_heads=4, feature_dim=8, graph_layers=1,
                            graph_scale_init=1.0)  # fmt: skip
    block = build_module(spec.submodules.self_attention, config=mc, layer_number=1).eval()
    assert isinstance(block, RoutedSelfAttention)
    copy_attention(ours, block)
    x = torch.randn(12, 3, 32, requires_grad=True)  # [s, b, d]
    out, bias = block(x, None)
    expected = ours(x.transpose(0, 1), is_causal=True).output.transpose(0, 1)
    torch.testing.assert_close(out + bias, expected, atol=1e-5, rtol=1e-5)
    (grad_theirs,) = torch.autograd.grad((out + bias).square().sum(), x)
    (grad_ours,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad_theirs, grad_ours, atol=1e-5, rtol=1e-5)
    fresh = type(ours)(32, 8, 2, 3, num_kv_heads=4, **(
        {} if kind == "moh" else {"feature_dim": 8, "graph_layers": 1}))  # fmt: skip
    copy_attention(block, fresh)
    for (name, a), b in zip(ours.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("no_rope", [False, True])
def test_with_every_head_on_a_routed_block_is_megatrons_own_self_attention(no_rope):
    """Megatron's SelfAttention is the oracle for what RoutedSelfAttention re-implements:
    with uniform routing and every head on (all gates 1) they agree, rotary positions
    included, also on a layer that ``no_rope_freq`` exempts from them (which the routed
    block used to rotate anyway)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from graphheads.integrations.megatron import TorchCoreAttention, rotary_on_cpu

    mc = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=8,
                           num_query_groups=4, use_cpu_initialization=True,
                           hidden_dropout=0.0, attention_dropout=0.0,
                           no_rope_freq=[1] if no_rope else None)  # fmt: skip
    dense_spec = get_gpt_layer_local_spec().submodules.self_attention
    dense_spec.submodules.core_attention = TorchCoreAttention
    dense = build_module(dense_spec, config=mc, layer_number=1).eval()
    routed = build_module(
        goh_layer_spec(2, 6).submodules.self_attention, config=mc, layer_number=1
    ).eval()
    routed.router.reset_to_uniform()  # every gate exactly 1
    routed.load_state_dict(dense.state_dict(), strict=False)
    x = torch.randn(12, 3, 32)  # [s, b, d]
    rope = RotaryEmbedding(kv_channels=4, rotary_percent=1.0, use_cpu_initialization=True)
    rotary_on_cpu(rope)
    emb = rope(12)
    expected, _ = dense(x, None, rotary_pos_emb=emb)
    out, _ = routed(x, None, rotary_pos_emb=emb)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_core_attention_reads_megatron_boolean_masks():
    """Megatron's masks are boolean, True = masked: a causal mask given explicitly changes
    nothing, and a key-padding mask gives graphheads' key_padding_mask result."""
    mc = _config(use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    block = build_module(
        goh_layer_spec(1, 2).submodules.self_attention, config=mc, layer_number=1
    ).eval()
    ours = GoHAttention(32, 4, 1, 2)
    copy_attention(ours, block)
    x = torch.randn(7, 2, 32)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)[None, None]  # (1, 1, s, s)
    torch.testing.assert_close(block(x, causal)[0], block(x, None)[0])
    padded = torch.zeros(2, 7, dtype=torch.bool)
    padded[1, 5:] = True  # the second sequence's last two keys are padding
    out = block(x, causal | padded[:, None, None, :])[0] + block(x, None)[1]
    expected = ours(x.transpose(0, 1), is_causal=True, key_padding_mask=padded).output
    torch.testing.assert_close(out, expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_qkv_layout_is_grouped_by_key_value_group():
    heads, groups, e = 4, 2, 3
    q = torch.arange(heads * e).float()[:, None] + 100  # rows named by value
    k = torch.arange(groups * e).float()[:, None] + 200
    v = torch.arange(groups * e).float()[:, None] + 300
    fused = pack_qkv(q, k, v, heads, groups).squeeze(-1)
    group0 = torch.cat([q[:6, 0], k[:3, 0], v[:3, 0]])  # heads 0-1, then key 0, value 0
    torch.testing.assert_close(fused[:12], group0)
    for a, b in zip(unpack_qkv(fused[:, None], heads, groups), (q, k, v), strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def tensor_parallel_runs(tmp_path_factory):
    """The worker at TP 1, TP 2, TP 2 with each rank's heads reversed, PP 2, and TP 1 and
    2 with a single key/value group."""
    folder = tmp_path_factory.mktemp("tp")
    runs = {  # in this order: the pipeline run loads the TP-1 run's weights
        "tp1": (1, []),
        "tp2": (2, []),
        "tp2_reversed": (2, ["--reverse-local-heads"]),
        "pp2": (2, ["--pipeline", str(folder / "tp1.weights")]),
        # one key/value group for two ranks: Megatron gathers the group on each rank
        "tp1_kv1": (1, ["--kv-heads", "1"]),
        "tp2_kv1": (2, ["--kv-heads", "1"]),
    }
    results = {}
    for name, (world, extra) in runs.items():
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={world}"]  # fmt: skip
        subprocess.run(
            [*launcher, str(WORKER), str(folder / name), *extra],
            check=True,
            cwd=ROOT,
            capture_output=True,
            timeout=300,
        )
        results[name] = [
            torch.load(folder / f"{name}.rank{r}", weights_only=True) for r in range(world)
        ]
    return results


@pytest.mark.slow
def test_tensor_parallel_2_gives_the_tp1_logits_and_gradients(tensor_parallel_runs):
    (one,) = tensor_parallel_runs["tp1"]
    two = tensor_parallel_runs["tp2"]
    for rank in two:
        torch.testing.assert_close(rank["logits"], one["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rank["loss"], one["loss"], atol=1e-5, rtol=1e-5)
        assert rank["grads"].keys() == one["grads"].keys()
        for name, grad in one["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # replicated router and head-graph parameters: the same full gradient on every rank
    assert two[0]["router_grads"]
    for name, grad in two[0]["router_grads"].items():
        torch.testing.assert_close(two[1]["router_grads"][name], grad, atol=0, rtol=0)


@pytest.mark.slow
def test_fewer_key_value_groups_than_ranks_give_the_tp1_logits_and_gradients(tensor_parallel_runs):
    """num_query_groups 1 < TP 2: each rank attends with H / TP = 2 query heads of the one
    group (before, the gates of H / G = 4 heads were read: rank 1 crashed)."""
    (one,) = tensor_parallel_runs["tp1_kv1"]
    for rank in tensor_parallel_runs["tp2_kv1"]:
        torch.testing.assert_close(rank["logits"], one["logits"], atol=1e-5, rtol=1e-5)
        for name, grad in one["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_pipeline_parallel_2_gives_the_tp1_logits_and_gradients(tensor_parallel_runs):
    """Each stage builds its own layers' routers; together they compute the TP-1 model:
    the last stage's logits and loss, and every parameter's gradient on the stage that
    holds it (the first stage's include the load-balance loss of its layer)."""
    (one,) = tensor_parallel_runs["tp1"]
    first, last = tensor_parallel_runs["pp2"]
    torch.testing.assert_close(last["logits"], one["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last["loss"], one["loss"], atol=1e-5, rtol=1e-5)
    grads = {**first["grads"], **last["grads"]}
    assert grads.keys() == one["grads"].keys()
    assert any(name.startswith("decoder.layers.0.") for name in first["grads"])
    assert any(name.startswith("decoder.layers.1.") for name in last["grads"])
    for name, grad in one["grads"].items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_local_head_j_on_rank_r_is_global_head_r_times_heads_local_plus_j(tensor_parallel_runs):
    """Reversing the heads inside each rank breaks the equality with TP 1: the TP-2
    comparison above checks the mapping, not just that something runs."""
    (one,) = tensor_parallel_runs["tp1"]
    reversed_run = tensor_parallel_runs["tp2_reversed"][0]
    # equal runs agree to ~1e-8 (logits) and ~1e-6 (gradients): these are far outside
    assert (reversed_run["logits"] - one["logits"]).abs().max() > 1e-3
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert (reversed_run["grads"][name] - one["grads"][name]).abs().max() > 1e-3


def _config(**overrides) -> TransformerConfig:
    values = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4}
    return TransformerConfig(**{**values, **overrides})


@pytest.mark.parametrize(
    ("key", "overrides"),
    [
        ("sequence_parallel", {"sequence_parallel": True, "tensor_model_parallel_size": 2}),
        ("context_parallel_size", {"context_parallel_size": 2}),
        ("attention_output_gate", {"attention_output_gate": True}),
        ("fused_single_qkv_rope", {"fused_single_qkv_rope": True}),
        (
            "fine_grained_activation_offloading",
            {"fine_grained_activation_offloading": True, "offload_modules": ["core_attn"]},
        ),
    ],
)
def test_unsupported_parallelism_is_refused_by_name(key, overrides):
    with pytest.raises(ValueError, match=key):
        check_megatron_config(_config(**overrides))


@pytest.mark.parametrize(
    ("key", "overrides"),
    [
        ("block", {"block": "vaswani"}),
        ("share_graph", {"share_graph": True}),
        ("carry_head_states", {"carry_head_states": True}),
        ("balance", {"balance": "bias"}),
    ],
)
def test_build_gpt_refuses_configs_it_cannot_match(key, overrides):
    config = llama_config("goh")
    config = ModelConfig.from_dict({**config.__dict__, **overrides})
    with pytest.raises(ValueError, match=key):
        build_gpt(config)


def test_refused_forward_inputs_and_router_options():
    mc = _config(use_cpu_initialization=True)
    spec = goh_layer_spec(1, 2)
    block = build_module(spec.submodules.self_attention, config=mc, layer_number=1)
    x = torch.randn(5, 2, 32)
    with pytest.raises(ValueError, match="inference contexts"):
        block(x, None, inference_context=object())
    with pytest.raises(ValueError, match="packed sequences"):
        block(x, None, packed_seq_params=PackedSeqParams())
    bad = goh_layer_spec(1, 2, carry_head_states=True).submodules.self_attention
    with pytest.raises(ValueError, match="carry_head_states"):
        build_module(bad, config=mc, layer_number=1)
    bad.params["router"] = "linear"
    with pytest.raises(ValueError, match="'linear'"):
        build_module(bad, config=mc, layer_number=1)
    with pytest.raises(ValueError, match="tensor-parallel size 1"):
        copy_attention(MoHAttention(32, 4, 1, 2), _tp2_block())


def _tp2_block():
    """A stand-in Megatron block whose config says tensor-parallel size 2."""
    block = build_module(
        moh_layer_spec(1, 2).submodules.self_attention,
        config=_config(use_cpu_initialization=True),
        layer_number=1,
    )
    block.config = _config(tensor_model_parallel_size=2)
    return block


@pytest.mark.slow
def test_pretraining_example_trains_under_torchrun_at_tp2(tmp_path):
    out = tmp_path / "metrics.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]  # fmt: skip
    result = subprocess.run(
        [*launcher, str(EXAMPLE), "--tensor-parallel", "2", "--steps", "60", "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    metrics = json.loads(out.read_text())
    assert metrics["tensor_parallel"] == 2 and metrics["steps"] == 60, result.stdout
    first, last = metrics["loss"][0], metrics["loss"][-1]
    assert last < 0.8 * first, metrics["loss"]
    assert metrics["head_load_balancing_loss"] > 0


def test_megatron_lm_spec_comes_from_the_environment_and_logs_its_head_loss():
    """``pretrain_gpt.py --spec graphheads.integrations.megatron.lm layer_spec``: the spec
    the GRAPHHEADS_* variables describe builds the GPT that build_gpt builds; bad values
    are refused by name; log_head_loss gives the mean over layers and clears it."""
    from megatron.core.models.gpt import GPTModel

    from graphheads.integrations.megatron import lm, rotary_on_cpu

    env = {"GRAPHHEADS_ATTENTION": "goh", "GRAPHHEADS_NUM_SHARED": "1", "GRAPHHEADS_TOP_K": "2",
           "GRAPHHEADS_FEATURE_DIM": "8", "GRAPHHEADS_GRAPH_LAYERS": "1"}  # fmt: skip
    spec = lm.spec_from_env(env)
    params = spec.submodules.self_attention.params
    assert (params["router"], params["num_shared"], params["top_k"]) == ("goh", 1, 2)
    assert params["router_kwargs"] == {"feature_dim": 8, "graph_layers": 1}
    moh = lm.spec_from_env({**env, "GRAPHHEADS_ATTENTION": "moh"}).submodules.self_attention
    assert moh.params["router"] == "moh"
    for bad, match in (
        ({"GRAPHHEADS_TOP_K": "two"}, "GRAPHHEADS_TOP_K='two' is not a int"),
        ({"GRAPHHEADS_ATENTION": "goh"}, r"unknown setting\(s\) \['GRAPHHEADS_ATENTION'\]"),
        ({"GRAPHHEADS_ATTENTION": "mha"}, "GRAPHHEADS_ATTENTION='mha', expected"),
        ({"GRAPHHEADS_CORE_ATTENTION": "flash"}, "GRAPHHEADS_CORE_ATTENTION='flash'"),
        ({"GRAPHHEADS_LOAD_BALANCE_COEFF": "nan"}, "must be a finite number >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            lm.spec_from_env({**env, **bad})
    assert lm.spec_from_env({**env, "GRAPHHEADS_HOME": "/x"})  # not a name of ours
    config = llama_config("goh", graph_feature_dim=8, graph_layers=1)
    reference = build_gpt(config)
    gpt = GPTModel(reference.config, spec, vocab_size=64, max_sequence_length=32,
                   position_embedding_type="rope")  # fmt: skip
    rotary_on_cpu(gpt)
    shapes = {n: p.shape for n, p in gpt.named_parameters()}
    assert shapes == {n: p.shape for n, p in reference.named_parameters()}
    clear_aux_losses_tracker()
    ids, positions = tokens()
    with torch.no_grad():  # full recomputation's first pass: not tracked (it used to be)
        gpt.train()(ids, positions, None, labels=ids)
    tracked = get_moe_layer_wise_logging_tracker().get(AUX_LOSS_NAME, {"values": torch.zeros(1)})
    assert tracked["values"].abs().sum() == 0
    gpt.train()(ids, positions, None, labels=ids).mean().backward()
    per_layer = get_moe_layer_wise_logging_tracker()[AUX_LOSS_NAME]["values"].clone()
    logged = lm.log_head_loss(iteration=1)
    torch.testing.assert_close(logged[AUX_LOSS_NAME], per_layer.mean())
    assert get_moe_layer_wise_logging_tracker()[AUX_LOSS_NAME]["values"].abs().sum() == 0
