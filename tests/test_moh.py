import math

import pytest
import torch
import torch.nn.functional as F

from graphheads import DecoderOnlyLM, ModelConfig, MoHAttention, MoHRouter, MultiHeadAttention
from graphheads.data import IGNORE_INDEX, copy_task
from graphheads.gates import load_balance_loss

D = 24


def reference_gates(x, w_r, w_s, w_h, num_heads, num_shared, top_k, convention="reference"):
    """The gate of the released MoH code, token by token, written from the equations."""
    tokens = x.reshape(-1, x.size(-1))
    n_routed = num_heads - num_shared
    gates, probs_all, masks = [], [], []
    for xt in tokens:
        g = torch.zeros(num_heads)
        p = torch.softmax(xt @ w_r.T, -1) if n_routed else torch.zeros(0)
        chosen = sorted(torch.argsort(p, descending=True)[:top_k].tolist())
        m = torch.zeros(n_routed)
        m[chosen] = 1.0
        if convention == "reference":
            g_r = top_k * p * m / max(float((p * m).sum()), torch.finfo(torch.float32).eps)
            g_s = (
                num_shared * torch.softmax(xt @ w_s.T, -1)
                if num_shared > 1
                else torch.ones(num_shared)
            )
            a = 2 * torch.softmax(xt @ w_h.T, -1) if (num_shared and n_routed) else torch.ones(2)
        else:
            g_r = p * m
            g_s = torch.softmax(xt @ w_s.T, -1) if num_shared > 1 else torch.ones(num_shared)
            a = torch.softmax(xt @ w_h.T, -1) if (num_shared and n_routed) else torch.ones(2)
        g[:num_shared] = a[0] * g_s
        g[num_shared:] = a[1] * g_r
        gates.append(g)
        probs_all.append(p)
        masks.append(m)
    probs, mask = torch.stack(probs_all), torch.stack(masks)
    loss = n_routed * (probs.mean(0) * mask.mean(0)).sum() if n_routed else torch.tensor(0.0)
    return torch.stack(gates).reshape(*x.shape[:-1], num_heads), loss


def reference_attention(module, x, gates, causal):
    """Per-head attention from the projection weights, heads scaled before out_proj."""
    b, t, _ = x.shape
    h = module.num_heads
    e = D // h
    q = (x @ module.q_proj.weight.T + module.q_proj.bias).reshape(b, t, h, e)
    k = (x @ module.k_proj.weight.T + module.k_proj.bias).reshape(b, t, h, e)
    v = (x @ module.v_proj.weight.T + module.v_proj.bias).reshape(b, t, h, e)
    heads = []
    for i in range(h):
        scores = q[:, :, i] @ k[:, :, i].transpose(1, 2) / math.sqrt(e)
        if causal:
            scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        heads.append(gates[:, :, i : i + 1] * (scores.softmax(-1) @ v[:, :, i]))
    return torch.cat(heads, -1) @ module.out_proj.weight.T + module.out_proj.bias


CASES = [(4, 0, 2), (4, 1, 2), (6, 2, 3), (6, 2, 4), (8, 3, 1), (4, 4, 0)]


@pytest.mark.parametrize(("num_heads", "num_shared", "top_k"), CASES)
@pytest.mark.parametrize("convention", ["reference", "paper"])
def test_moh_matches_independent_reference(num_heads, num_shared, top_k, convention):
    attn = MoHAttention(D, num_heads, num_shared, top_k, gate_convention=convention)
    r = attn.router
    with torch.no_grad():
        for gate in (r.routed_gate, r.shared_gate, r.type_gate):
            if gate is not None:
                gate.weight.normal_(std=1.0)  # sharp, distinct routing
    x = torch.randn(2, 5, D)
    out = attn(x, is_causal=True)
    n_routed = num_heads - num_shared
    w_r = r.routed_gate.weight if r.routed_gate is not None else torch.zeros(0, D)
    w_s = r.shared_gate.weight if r.shared_gate is not None else None
    w_h = r.type_gate.weight if r.type_gate is not None else None
    with torch.no_grad():
        gates, loss = reference_gates(x, w_r, w_s, w_h, num_heads, num_shared, top_k, convention)
    torch.testing.assert_close(out.routing.gates, gates, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.routing.load_balance_loss, loss, atol=1e-6, rtol=1e-5)
    expected = reference_attention(attn, x, gates, causal=True)
    torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-5)
    assert out.routing.active_heads.sum(-1).eq(num_shared + top_k).all()
    assert out.routing.top_k_indices.shape == (2, 5, top_k if n_routed else 0)


def test_submodule_names_are_public_api():
    names = {n for n, _ in MoHAttention(D, 6, 2, 2).named_parameters()}
    assert {
        "router.routed_gate.weight",
        "router.shared_gate.weight",
        "router.type_gate.weight",
    } <= names
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"} <= names
    assert MoHRouter(D, 6, 1, 2).shared_gate is None  # one shared head: gate is 1
    assert MoHRouter(D, 6, 0, 2).type_gate is None
    assert MoHRouter(D, 6, 6, 0).routed_gate is None


@pytest.mark.parametrize("num_shared", [0, 1, 3])
def test_uniform_routing_all_heads_equals_mha(num_shared):
    h = 6
    moh = MoHAttention(D, h, num_shared, h - num_shared)
    mha = MultiHeadAttention(D, h)
    mha.load_state_dict({k: v for k, v in moh.state_dict().items() if not k.startswith("router")})
    with torch.no_grad():
        for p in moh.router.parameters():
            p.zero_()  # uniform probabilities and equal two-stage weights
    x = torch.randn(2, 7, D)
    out = moh(x, is_causal=True)
    torch.testing.assert_close(out.routing.gates, torch.ones(2, 7, h))
    torch.testing.assert_close(out.output, mha(x, is_causal=True).output, atol=1e-6, rtol=1e-5)


def test_balanced_routing_loss_equals_top_k():
    n_routed, top_k, tokens = 4, 2, 8
    probs = torch.full((tokens, n_routed), 1 / n_routed)
    mask = torch.zeros(tokens, n_routed)
    for t in range(tokens):  # every head chosen equally often
        mask[t, [t % n_routed, (t + 1) % n_routed]] = 1
    assert load_balance_loss(probs, mask).item() == pytest.approx(top_k)
    # collapsed routing is penalised: all tokens on the same two heads
    collapsed = torch.zeros(tokens, n_routed)
    collapsed[:, :2] = 1
    peaked = torch.tensor([0.45, 0.45, 0.05, 0.05]).expand(tokens, -1)
    assert load_balance_loss(peaked, collapsed).item() > top_k


@pytest.mark.parametrize("hard_gates", [False, True])
def test_gradients_reach_every_router_weight(hard_gates):
    attn = MoHAttention(D, 6, 2, 2, hard_gates=hard_gates)
    x = torch.randn(2, 5, D)
    out = attn(x)
    if hard_gates:
        assert set(out.routing.gates.unique().tolist()) <= {0.0, 1.0}
    (out.output.square().sum() + out.routing.load_balance_loss).backward()
    for name, p in attn.router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_free_router_follows_query_norms():
    router = MoHRouter(D, 6, 2, 2, parameter_free=True)
    assert not list(router.parameters())
    queries = torch.randn(3, 4, 6, 4)
    out = router(torch.randn(3, 4, D), queries=queries)
    norms = queries[..., 2:, :].norm(dim=-1)
    expected = torch.softmax(norms / (norms.std(-1, keepdim=True) + 1.1920929e-07), -1)
    torch.testing.assert_close(out.router_probs, expected)
    chosen = norms.topk(2, -1).indices.sort(-1).values
    torch.testing.assert_close(out.top_k_indices.sort(-1).values, chosen)
    with pytest.raises(ValueError, match="parameter_free routing needs the per-head queries"):
        router(torch.randn(3, 4, D))


def test_routing_of_a_token_depends_only_on_that_token():
    attn = MoHAttention(D, 6, 2, 3)
    x = torch.randn(1, 6, D)
    y = x.clone()
    y[:, 4] = torch.randn(D)
    a, b = attn(x, is_causal=True).routing.gates, attn(y, is_causal=True).routing.gates
    keep = [0, 1, 2, 3, 5]
    torch.testing.assert_close(a[:, keep], b[:, keep])
    assert not torch.allclose(a[:, 4], b[:, 4])


def test_moh_lm_is_causal_and_cache_matches():
    model = DecoderOnlyLM(
        ModelConfig(
            vocab_size=20,
            d_model=D,
            num_heads=6,
            num_layers=2,
            attention="moh",
            num_shared=2,
            top_k=2,
        )
    ).eval()
    tokens = torch.randint(0, 20, (2, 9))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 20
    full = model(tokens)
    torch.testing.assert_close(full.logits[:, :5], model(changed).logits[:, :5])
    assert len(full.routing) == 2
    torch.testing.assert_close(full.aux_loss, sum(r.load_balance_loss for r in full.routing))
    first = model(tokens[:, :6], use_cache=True)
    rest = model(tokens[:, 6:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(
        torch.cat([first.logits, rest.logits], 1), full.logits, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        rest.routing[0].gates, full.routing[0].gates[:, 6:], atol=1e-6, rtol=1e-5
    )


def train_copy(attention: str, steps: int = 250, **kw) -> tuple[float, float]:
    """Train a tiny LM on the copy task; return (eval loss, eval accuracy)."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=12,
        d_model=64,
        num_heads=4,
        num_layers=2,
        d_ff=128,
        max_seq_len=32,
        norm_first=True,
        attention=attention,
        **kw,
    )
    model = DecoderOnlyLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = copy_task(32, 6, 12, generator=gen)
        out = model(batch.inputs)
        loss = F.cross_entropy(
            out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
        )
        if out.routing:
            loss = loss + 0.01 * out.aux_loss / len(out.routing)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch = copy_task(256, 6, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(batch.inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    scored = batch.targets != IGNORE_INDEX
    return loss.item(), (logits.argmax(-1) == batch.targets)[scored].float().mean().item()


def test_moh_lm_learns_copy_task():
    loss, acc = train_copy("moh", num_shared=1, top_k=2)
    assert loss < 0.3 and acc > 0.9, (loss, acc)  # chance: loss 2.4, accuracy 0.09


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_routing_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    attn = MoHAttention(D, 6, 2, 3)
    x = torch.randn(2, 5, D)
    compiled = torch.compile(attn, fullgraph=True, backend=backend)  # fails on a graph break
    out = compiled(x, is_causal=True)
    ref = attn(x, is_causal=True)
    torch.testing.assert_close(out.output, ref.output)
    torch.testing.assert_close(out.routing.gates, ref.routing.gates)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            (6, 2, 5),
            r"top_k \(5\) must be in \[1, routed heads \(4\) = "
            r"num_heads \(6\) - num_shared \(2\)\]",
        ),
        ((6, 7, 0), r"num_shared \(7\) must be in \[0, num_heads \(6\)\]"),
        ((6, 2, 0), r"top_k \(0\) must be in \[1, routed heads \(4\)"),
        ((6, 6, 1), r"top_k \(1\) must be 0 when every head is shared"),
    ],
)
def test_bad_routing_config_raises(args, match):
    with pytest.raises(ValueError, match=match):
        MoHAttention(D, *args)
    with pytest.raises(ValueError, match=match):
        MoHRouter(D, *args)


def test_load_balance_loss_counts_only_real_tokens():
    probs = torch.softmax(torch.randn(2, 5, 4), -1)
    mask = torch.zeros_like(probs).scatter(-1, probs.topk(2, -1).indices, 1.0)
    real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = load_balance_loss(probs[real].unsqueeze(0), mask[real].unsqueeze(0))
    torch.testing.assert_close(load_balance_loss(probs, mask, padding_mask=~real), expected)
    with pytest.raises(ValueError, match=r"padding_mask has shape \(2, 4\), expected \(2, 5\)"):
        load_balance_loss(probs, mask, padding_mask=~real[:, :4])


@pytest.mark.parametrize("attention", ["moh", "goh"])
def test_padding_changes_neither_the_load_balance_loss_nor_its_gradient(attention):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=20, d_model=D, num_heads=6, num_layers=2, attention=attention, num_shared=2
    )
    model = DecoderOnlyLM(config)
    tokens = torch.randint(2, 20, (3, 7))
    padded = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)  # right padding
    padding = torch.zeros(3, 12, dtype=torch.bool)
    padding[:, 7:] = True
    results = []
    for inputs, kwargs in ((tokens, {}), (padded, {"key_padding_mask": padding})):
        model.zero_grad()
        aux = model(inputs, **kwargs).aux_loss
        aux.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((aux.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[0][1].keys() == results[1][1].keys()
    assert any("router" in name for name in results[0][1])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_split_linear_is_the_separate_projections():
    from graphheads.gates import split_linear

    x = torch.randn(2, 3, D)
    w1, w2 = torch.randn(5, D), torch.randn(2, D)
    a, none, b = split_linear(x, [w1, None, w2])
    assert none is None
    torch.testing.assert_close(a, x @ w1.T)
    torch.testing.assert_close(b, x @ w2.T)
    assert split_linear(x, [None, None]) == [None, None]


def test_reset_to_uniform_lets_each_token_pick_its_heads_with_gates_near_one():
    """With top_k below the routed count, zero logits sent every token to the same heads
    (top-k's ties break by index); with every routed head on, the gates stay exactly 1."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32)
    router = MoHRouter(32, 8, 2, 2)
    router.reset_to_uniform()
    routing = router(x)
    chosen = {tuple(sorted(row)) for row in routing.top_k_indices.flatten(0, 1).tolist()}
    assert len(chosen) > 5  # of the 15 pairs of 6 routed heads
    torch.testing.assert_close(routing.gates[..., :2], torch.ones(2, 64, 2))
    on = routing.gates[..., 2:][routing.routed_mask > 0]
    assert (on - 1).abs().max() < 0.05
    every = MoHRouter(32, 8, 2, 6)
    every.reset_to_uniform()
    torch.testing.assert_close(every(x).gates, torch.ones(2, 64, 8), rtol=0, atol=0)
    with pytest.raises(ValueError, match="spread must be > 0, got 0"):
        every.reset_to_uniform(spread=0)
