"""One name per concept across the public API (issue 32): a walk over every public
constructor, method and function, and the renamed arguments' one-release grace."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator

import pytest
import torch

import graphheads
from graphheads import DecoderOnlyLM, GoHAttention, GraphRouter, HeadMessagePassing, ModelConfig
from graphheads.generation import decode, sample_next_token

# names that once meant two things, each with the one meaning it keeps
ONE_MEANING = {
    "num_layers": "transformer layers",
    "graph_layers": "message-passing layers of a graph-router",
    "top_k": "routed heads per token",
    "sample_top_k": "the best tokens sampling draws from",
}
# the old names that still work for one release, with the name that replaced them
DEPRECATED = {
    ("GraphRouter", "num_layers"): "graph_layers",
    ("GoHAttention", "num_layers"): "graph_layers",
    ("HeadMessagePassing", "num_layers"): "graph_layers",
    ("convert_to_goh", "num_layers"): "graph_layers",
    ("sample_next_token", "top_k"): "sample_top_k",
    ("decode", "top_k"): "sample_top_k",
    ("DecoderOnlyLM.generate", "top_k"): "sample_top_k",
    ("Transformer.generate", "top_k"): "sample_top_k",
}
# how a callable says what it is about: a graph-router's settings, or sampling
ABOUT = {"feature_dim": "graph-router", "temperature": "sampling"}
# in such a callable, a name of ONE_MEANING with another meaning may appear only deprecated
CLASHES = {("graph-router", "num_layers"), ("sampling", "top_k")}


def public_callables() -> Iterator[tuple[str, Callable]]:
    """Every public class (its constructor and public methods) and function that a
    graphheads module lists in ``__all__`` (integrations whose extra is missing are
    skipped), each once, named ``Class``, ``Class.method`` or ``function``."""
    seen: set[int] = set()
    names = ["graphheads"] + [
        m.name
        for m in pkgutil.walk_packages(graphheads.__path__, "graphheads.")
        if not m.name.endswith("__main__")  # runs the CLI when imported
    ]
    for module_name in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if id(obj) in seen or not callable(obj):
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                yield name, obj
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member):
                        yield f"{name}.{attr}", member
            elif inspect.isfunction(obj):
                yield name, obj


def parameters(obj: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return {}


def test_no_public_name_means_two_things():
    walked = dict(public_callables())
    assert {"GoHAttention", "ModelConfig", "DecoderOnlyLM.generate", "sample_next_token"} <= set(
        walked
    )  # the walk reaches them
    clashes = []
    for name, obj in walked.items():
        params = parameters(obj)
        topics = {topic for param, topic in ABOUT.items() if param in params}
        for topic, param in CLASHES:
            if topic in topics and param in params and (name, param) not in DEPRECATED:
                clashes.append(f"{name}({param}=): {param} means {ONE_MEANING[param]}")
    assert not clashes, clashes
    for (name, old), new in DEPRECATED.items():
        if name not in walked:  # an integration whose extra is not installed
            continue
        params = parameters(walked[name])
        assert new in params, f"{name} lacks {new}="
        assert params[old].default is None, f"{name}({old}=) must default to None"


def test_old_names_warn_naming_the_new_one_and_do_what_they_did():
    with pytest.warns(DeprecationWarning, match="num_layers= is deprecated.*use graph_layers="):
        router = GraphRouter(16, 4, 1, 2, num_layers=1)
    assert len(router.message_passing.layers) == 1
    with pytest.warns(DeprecationWarning, match="GoHAttention: num_layers="):
        attention = GoHAttention(16, 4, 1, 2, num_layers=3)
    assert len(attention.router.message_passing.layers) == 3
    with pytest.warns(DeprecationWarning, match="HeadMessagePassing: num_layers="):
        assert len(HeadMessagePassing(8, num_layers=2).layers) == 2
    assert len(GoHAttention(16, 4, 1, 2).router.message_passing.layers) == 2  # the default
    with pytest.raises(ValueError, match="got both num_layers= and graph_layers="):
        GraphRouter(16, 4, 1, 2, num_layers=1, graph_layers=1)

    logits = torch.randn(5, 30)
    new = sample_next_token(logits, sample_top_k=3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DeprecationWarning, match="sample_next_token: top_k= .*sample_top_k="):
        old = sample_next_token(logits, top_k=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    torch.manual_seed(0)
    model = DecoderOnlyLM(ModelConfig(vocab_size=30, attention="moh", num_shared=1)).eval()
    prompt = torch.randint(0, 30, (2, 3))
    seed = torch.Generator().manual_seed
    new = model.generate(prompt, 4, temperature=1.0, sample_top_k=2, generator=seed(1))
    with pytest.warns(DeprecationWarning, match="generate: top_k= .*sample_top_k="):
        old = model.generate(prompt, 4, temperature=1.0, top_k=2, generator=seed(1))
    assert torch.equal(old, new)
    with pytest.raises(ValueError, match="got both top_k= and sample_top_k="):
        model.generate(prompt, 4, top_k=2, sample_top_k=2)


def test_every_constructor_of_routed_attention_takes_the_sparse_chunk_rows():
    """``sparse_chunk_rows`` was a TypeError in MoHAttention and GoHAttention."""
    for cls in (graphheads.MoHAttention, GoHAttention):
        assert cls(16, 4, 1, 2, sparse_chunk_rows=7).sparse_chunk_rows == 7


@pytest.mark.parametrize(
    ("attention", "settings", "message"),
    [
        ("mha", {"num_shared": 2}, r"num_shared=2 set, but attention='mha' has no router"),
        ("mha", {"top_k": 3, "balance": "bias"}, r"top_k=3, balance='bias' set"),
        ("mha", {"execution": "sparse"}, r"execution='sparse' set, but attention='mha'"),
        ("mha", {"graph_layers": 3}, r"graph_layers=3 set, but attention='mha'"),
        ("moh", {"graph": "ring"}, r"graph='ring' set, but attention='moh' has no graph-router"),
        ("moh", {"carry_head_states": True}, r"carry_head_states=True set"),
    ],
)
def test_settings_the_attention_kind_would_ignore_are_refused(attention, settings, message):
    """``num_shared``/``top_k``/``balance`` with attention='mha' (or a graph with 'moh')
    were silently ignored."""
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=20, attention=attention, **settings)


def test_a_run_switching_the_default_model_to_mha_drops_only_the_settings_it_did_not_ask_for():
    """The main job's default model is GoH (2 shared, top-3): a run asking for
    attention='mha' gets plain MHA; asking for MHA with another top_k is refused; a
    saved config of an MHA run written before the refusal still loads."""
    from graphheads.train import RunConfig

    config = RunConfig.load(None, ["model.attention=mha"]).model_config(30, 16)
    assert config.attention == "mha" and config.num_shared == 0 and config.top_k is None
    moh = RunConfig.load(None, ["model.attention=moh"]).model_config(30, 16)
    assert (moh.num_shared, moh.top_k, moh.graph_layers) == (2, 3, 2)  # routing kept
    with pytest.raises(ValueError, match=r"top_k=2 set, but attention='mha'"):
        RunConfig.load(None, ["model.attention=mha", "model.top_k=2"]).model_config(30, 16)
    saved = {**dataclasses.asdict(config), "num_shared": 2, "top_k": 3, "graph": "ring"}
    assert ModelConfig.from_saved(saved) == config  # a checkpoint written before
    with pytest.raises(ValueError, match="num_shared=2, top_k=3, graph='ring' set"):
        ModelConfig.from_dict(saved)  # what a user gives is checked
    with pytest.raises(ValueError, match="top_k=2 set, but attention='mha'"):
        ModelConfig.llama("llama-10m", 100, top_k=2)  # a preset's overrides too
    # the file `graphheads config` writes holds the default model's routing: switching
    # it to mha is not asking for that routing
    written = RunConfig.from_dict({"model": dataclasses.asdict(moh) | {"attention": "mha"}})
    assert written.model_config(30, 16).num_shared == 0


def test_a_deprecation_names_the_line_of_the_caller(recwarn):
    """The warning points at the user's line, also through generate's @torch.no_grad()
    (Python's default filters show a DeprecationWarning only there)."""
    model = DecoderOnlyLM(ModelConfig(vocab_size=30, attention="moh", num_shared=1)).eval()
    prompt = torch.randint(0, 30, (1, 2))
    model.generate(prompt, 1, temperature=1.0, top_k=2)
    GraphRouter(16, 4, 1, 2, num_layers=1)
    attention = graphheads.MoHAttention(16, 4, 1, 2)  # a module's forward: two frames more
    attention(torch.randn(1, 3, 16), token_mask=torch.ones(1, 3, dtype=torch.bool))
    step = lambda new, tokens, state: (torch.zeros(1, 30), None)  # noqa: E731
    assert decode(step, prompt, 1, vocab_size=30, max_len=8, top_k=2).shape == (1, 3)
    files = [w.filename for w in recwarn.list if issubclass(w.category, DeprecationWarning)]
    assert len(files) == 4 and all(f == __file__ for f in files), files


def test_one_mask_polarity_true_at_padding_and_the_old_one_still_works():
    """``key_padding_mask`` and ``padding_mask`` are True at padding everywhere; the old
    ``token_mask`` (True at real tokens) is accepted for one release, inverted, with a
    DeprecationWarning; a router written for the old protocol keeps working."""
    takes_token_mask = [  # the helper that converts the old mask is not an API of masks
        name
        for name, obj in public_callables()
        if "token_mask" in parameters(obj) and name != "padding_from_token_mask"
    ]
    assert "RoutedAttention.forward" in takes_token_mask and "load_balance_loss" in (
        takes_token_mask
    )
    for name in takes_token_mask:
        params = parameters(dict(public_callables())[name])
        assert "padding_mask" in params, f"{name} takes token_mask= without padding_mask="
        assert params["token_mask"].default is None, name

    torch.manual_seed(0)
    attention = graphheads.MoHAttention(16, 4, 1, 2)
    x, pad = torch.randn(2, 5, 16), torch.tensor([[True, False, False, False, False]] * 2)
    new = attention(x, padding_mask=pad).routing.load_balance_loss
    with pytest.warns(DeprecationWarning, match=r"token_mask= \(True at real tokens\)"):
        old = attention(x, token_mask=~pad).routing.load_balance_loss
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    assert not torch.equal(new, attention(x).routing.load_balance_loss)  # the mask counts

    class OldRouter(torch.nn.Module):  # a router written against 0.3's protocol
        num_heads = 4

        def __init__(self) -> None:
            super().__init__()
            self.inner = graphheads.MoHRouter(16, 4, 1, 2)

        def forward(self, x, *, queries=None, head_states=None, token_mask=None):
            self.seen = token_mask
            return self.inner(x, padding_mask=None if token_mask is None else ~token_mask)

    with pytest.warns(DeprecationWarning, match="OldRouter.forward takes token_mask="):
        legacy = graphheads.RoutedAttention(16, 4, router=OldRouter())
    legacy(x, padding_mask=pad)
    assert torch.equal(legacy.router.seen, ~pad)  # it gets the polarity it expects


def test_integer_and_additive_padding_masks_mean_what_boolean_ones_do():
    """``~`` of an int mask is -1/-2, not a negation: the loss came out near 432; a
    float (additive) key_padding_mask pads where it is -inf, for the routers too."""
    from graphheads.gates import load_balance_loss

    probs = torch.softmax(torch.randn(2, 5, 4), -1)
    chosen = torch.zeros_like(probs).scatter(-1, probs.topk(2, -1).indices, 1.0)
    pad = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    expected = load_balance_loss(probs, chosen, padding_mask=pad.bool())
    torch.testing.assert_close(load_balance_loss(probs, chosen, padding_mask=pad), expected)
    torch.manual_seed(0)
    model = DecoderOnlyLM(ModelConfig(vocab_size=30, attention="moh", num_shared=1))
    tokens = torch.randint(0, 30, (2, 5))
    additive = torch.zeros(2, 5).masked_fill(pad.bool(), float("-inf"))
    losses = [model(tokens, key_padding_mask=m).aux_loss for m in (pad.bool(), additive)]
    torch.testing.assert_close(losses[1], losses[0])  # -inf where padded: the same tokens
