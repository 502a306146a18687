import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import decoder_like, encoder_like

from graphheads import DecoderOnlyLM, ModelConfig, SinusoidalPositionalEncoding, Transformer
from graphheads.data import IGNORE_INDEX, copy_task

D, H, FF = 32, 4, 64


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_decoder_stack_matches_torch_transformer(norm_first):
    ref = nn.Transformer(
        d_model=D,
        nhead=H,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=FF,
        dropout=0.0,
        batch_first=True,
        norm_first=norm_first,
    )
    encoder = encoder_like(ref.encoder, D, H, FF, norm_first)
    decoder = decoder_like(ref.decoder, D, H, FF, norm_first)
    src, tgt = torch.randn(2, 9, D), torch.randn(2, 6, D)
    src_pad = torch.zeros(2, 9, dtype=torch.bool)
    src_pad[1, 7:] = True
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(6)
    expected = ref(
        src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad
    )
    memory = encoder(src, key_padding_mask=src_pad).hidden
    got = decoder(tgt, memory, memory_key_padding_mask=src_pad, is_causal=True).hidden
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sinusoidal_encoding_formula():
    pe = SinusoidalPositionalEncoding(6, 10).pe
    pos = 7  # dims 4 (sin) and 5 (cos) use frequency 10000^(-4/6)
    angle = pos / 10000 ** (4 / 6)
    assert pe[pos, 4].item() == pytest.approx(torch.sin(torch.tensor(angle)).item(), abs=1e-6)
    assert pe[pos, 5].item() == pytest.approx(torch.cos(torch.tensor(angle)).item(), abs=1e-6)


def _lm(**kw) -> DecoderOnlyLM:
    cfg = dict(vocab_size=20, d_model=D, num_heads=H, num_layers=2, d_ff=FF, max_seq_len=32)
    cfg.update(kw)
    return DecoderOnlyLM(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_lm_is_causal(norm_first):
    model = _lm(norm_first=norm_first)
    tokens = torch.randint(0, 20, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 3) % 20
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_lm_cached_decoding_matches_full_forward():
    model = _lm()
    tokens = torch.randint(0, 20, (3, 12))
    full = model(tokens).logits
    out = model(tokens[:, :5], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(5, 12):
        out = model(tokens[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    prompt = tokens[:, :4]
    torch.testing.assert_close(
        model.generate(prompt, 8), model.generate(prompt, 8, use_cache=False)
    )


def test_encoder_decoder_cached_generation_matches_full_forward():
    model = Transformer(
        ModelConfig(vocab_size=20, d_model=D, num_heads=H, num_layers=2, d_ff=FF, max_seq_len=32)
    ).eval()
    src = torch.randint(0, 20, (2, 7))
    start = torch.zeros(2, 1, dtype=torch.long)
    generated = model.generate(src, start, 6)
    # teacher-forced full forward on the generated prefix picks the same greedy tokens
    logits = model(src, generated[:, :-1]).logits
    torch.testing.assert_close(logits.argmax(-1), generated[:, 1:])


def test_sampling_with_top_k_only_picks_top_tokens():
    model = _lm()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 20, (4, 3))
    out = model.generate(prompt, 1, temperature=1.0, sample_top_k=2, generator=gen)
    top2 = model(prompt).logits[:, -1].topk(2).indices
    assert (out[:, -1:] == top2).any(-1).all()


def test_tiny_lm_learns_copy_task():
    torch.manual_seed(0)
    model = _lm(d_model=64, d_ff=128, vocab_size=12, norm_first=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        batch = copy_task(32, 6, 12, generator=gen)
        logits = model(batch.inputs).logits
        loss = F.cross_entropy(
            logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    batch = copy_task(256, 6, 12, generator=torch.Generator().manual_seed(1))
    model.eval()
    logits = model(batch.inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    scored = batch.targets != IGNORE_INDEX
    acc = (logits.argmax(-1) == batch.targets)[scored].float().mean()
    assert loss.item() < 0.3, loss.item()  # chance is ln(11) = 2.4
    assert acc.item() > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 30, "num_heads": 4}, r"d_model \(30\) must be divisible by num_heads \(4\)"),
        ({"vocab_size": 0}, r"vocab_size must be a positive int, got 0"),
        ({"attention": "flash"}, r"attention must be one of .* got 'flash'"),
        ({"activation": "tanh"}, r"activation must be 'relu' or 'gelu', got 'tanh'"),
        # combinations that failed only at forward or in training (issue 32)
        ({"attention": "moh", "execution": "sparse", "sparse_backend": "flex", "dropout": 0.1,
          "num_shared": 1}, r"sparse_backend='flex' has no attention dropout"),
    ],
)  # fmt: skip
def test_bad_config_raises(kwargs, match):
    cfg = dict(vocab_size=10, d_model=32, num_heads=4)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**cfg)


def test_config_from_dict_names_unknown_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) num_head \(did you mean num_heads\?\)"):
        ModelConfig.from_dict({"vocab_size": 10, "num_head": 4})
    with pytest.raises(ValueError, match=r"ModelConfig: d_model must be an int, got '64'"):
        ModelConfig(vocab_size=10, d_model="64")  # as a config file could give it
    with pytest.raises(ValueError, match=r"ModelConfig: norm_first must be true or false"):
        ModelConfig(vocab_size=10, norm_first="yes")


def test_bad_model_inputs_raise():
    model = _lm()
    with pytest.raises(ValueError, match=r"positions 0..32 exceed max_seq_len \(32\)"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"generate: prompt: token ids must lie in \[0, 20\), got range \[0, 25\]"
    ):
        model.generate(torch.tensor([[0, 25]]), 1)
    with pytest.raises(ValueError, match=r"the prompt must hold at least one token"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"expected token ids of shape \(batch, tokens\)"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"prompt \(30\) \+ max_new_tokens \(5\) - 1 positions exceed"
    ):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 5)


def test_top_k_default_is_explicit_and_meaningless_values_are_refused():
    config = ModelConfig(vocab_size=20, num_heads=8, num_shared=2, attention="moh")
    assert config.top_k is None and config.routed_top_k == 3  # half of the 6 routed heads
    assert ModelConfig(vocab_size=20, num_heads=4, num_shared=4, attention="moh").routed_top_k == 0
    for bad, match in [
        (dict(num_heads=8, num_shared=2, top_k=0), r"top_k \(0\) must be None .* or 1..6"),
        (dict(num_heads=8, num_shared=2, top_k=7), r"top_k \(7\) must be None .* or 1..6"),
        (dict(num_heads=4, num_shared=4, top_k=1), r"top_k \(1\) must be None .* or 0"),
        (dict(num_heads=4, num_shared=5), r"num_shared \(5\) must be an int in \[0, num_heads"),
    ]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(vocab_size=20, attention="moh", **bad)


def test_one_block_class_and_one_stack_class():
    from graphheads import TransformerBlock, TransformerStack

    lm = _lm()
    seq2seq = Transformer(ModelConfig(vocab_size=20, d_model=D, num_heads=H, d_ff=FF))
    for stack in (lm.decoder, seq2seq.encoder, seq2seq.decoder):
        assert type(stack) is TransformerStack
        assert all(type(block) is TransformerBlock for block in stack.layers)
    assert all(block.cross_attn is None for block in lm.decoder.layers)
    assert all(block.cross_attn is not None for block in seq2seq.decoder.layers)


def test_the_mask_is_built_once_per_forward_not_per_layer(monkeypatch):
    import graphheads.attention as attention_module
    import graphheads.masks as masks_module

    calls = []
    original = masks_module.build_attention_bias

    def counting(**kwargs):
        calls.append(kwargs["attn_mask"] is None)  # True: built from the raw masks
        return original(**kwargs)

    for module in (attention_module, masks_module):  # the stack's and the layers' calls
        monkeypatch.setattr(module, "build_attention_bias", counting)
    model = _lm(num_layers=3)
    tokens = torch.randint(0, 20, (2, 6))
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 4:] = True
    expected = model(tokens, key_padding_mask=padding).logits
    assert sum(calls) == 1  # merged once by the stack; the layers only pass it through
    # the merged bias gives what per-layer masking gives: every real token as before
    monkeypatch.undo()
    torch.testing.assert_close(expected[1], model(tokens[1:]).logits[0], atol=1e-5, rtol=1e-5)


def test_blocks_check_memory_against_cross_attention():
    from graphheads import MultiHeadAttention, TransformerBlock
    from graphheads.blocks import FeedForward

    block = TransformerBlock(
        self_attn=MultiHeadAttention(D, H), feed_forward=FeedForward(D, FF), d_model=D
    )
    with pytest.raises(
        ValueError, match=r"memory must be given exactly when .*\(cross_attn is None\)"
    ):
        block(torch.randn(1, 3, D), torch.randn(1, 4, D))
