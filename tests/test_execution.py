"""The execution policy (issue 32): one function chooses the path of a routed-attention
call, RoutedAttention runs the path it chose, and the docs table says what it does."""

import re
from pathlib import Path

import pytest
import torch

import graphheads.routed
from graphheads import MoHAttention
from graphheads.execution import ExecutionChoice, choose_execution
from graphheads.sparse import DECODE_MIN_SKIPPED_BYTES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "concepts.md"
H, E = 8, 32
SMALL = torch.empty(1, H, 16, E)  # skips a few KiB: never pays
# 4 of 8 heads active: skipped bytes = 2 * b * s * e * 4 bytes * 4 heads
LARGE = torch.empty(8, H, DECODE_MIN_SKIPPED_BYTES["cpu"] // (2 * 8 * E * 4 * 4), E)

# the docs table's columns, as the calls that fall in them
COLUMNS = {
    "training": [dict(query_len=9, grad=True, dropout_p=0.0), dict(query_len=1, grad=True,
                 dropout_p=0.0), dict(query_len=9, grad=False, dropout_p=0.0),
                 dict(query_len=1, grad=False, dropout_p=0.1)],
    "eager": [dict(query_len=1, grad=False, dropout_p=0.0, compiled=False)],
    "compiled": [dict(query_len=1, grad=False, dropout_p=0.0, compiled=True)],
}  # fmt: skip


def paths(execution: str, calls: list[dict]) -> set[str]:
    return {
        choose_execution(execution, key=key, num_active=4, **call).path
        for call in calls
        for key in (SMALL, LARGE)
    }


def docs_table() -> dict[str, list[set[str]]]:
    """``execution`` -> the path names (in backticks) of each column of the docs table."""
    text = DOCS.read_text()
    start = text.index("| `execution` | training, prompts")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = re.match(r'`"(\w+)"`', cells[0])
        assert name, line
        rows[name.group(1)] = [
            set(re.findall(r"`(dense|sparse|decode)`", cell)) for cell in cells[1:]
        ]
    return rows


def test_the_docs_table_is_the_policy():
    table = docs_table()
    assert set(table) == {"auto", "dense", "sparse"}
    for execution, cells in table.items():
        chosen = [paths(execution, calls) for calls in COLUMNS.values()]
        assert cells == chosen, execution


def test_choices_and_reasons():
    auto = choose_execution(
        "auto", query_len=1, grad=False, dropout_p=0.0, key=LARGE, num_active=4, compiled=True
    )
    assert auto == ExecutionChoice("decode", auto.reason) and "compiled" in auto.reason
    # more active heads than the skipped bytes allow: dense
    full = choose_execution(
        "auto", query_len=1, grad=False, dropout_p=0.0, key=LARGE, num_active=8, compiled=True
    )
    assert full.path == "dense"
    sparse = choose_execution(
        "sparse", query_len=5, grad=True, dropout_p=0.0, key=SMALL, num_active=4
    )
    assert (sparse.path, sparse.backend) == ("sparse", "chunked")
    flex = choose_execution(
        "sparse",
        query_len=5,
        grad=False,
        dropout_p=0.0,
        key=SMALL,
        num_active=4,
        sparse_backend="flex",
    )
    assert flex.backend == "flex"
    with pytest.raises(ValueError, match=r"execution must be .* got 'fast'"):
        choose_execution("fast", query_len=1, grad=False, dropout_p=0.0, key=SMALL, num_active=4)


@pytest.mark.parametrize("path", ["dense", "sparse", "decode"])
def test_routed_attention_runs_the_path_the_policy_chose(monkeypatch, path):
    """The module consults the policy (its answer decides the kernel, whatever the
    module's setting) and every path gives the dense output."""
    calls = []
    for kernel in ("sparse_routed_attention", "routed_decode_attention"):
        original = getattr(graphheads.routed, kernel)
        monkeypatch.setattr(
            graphheads.routed,
            kernel,
            lambda *a, _k=kernel, _f=original, **kw: calls.append(_k) or _f(*a, **kw),
        )
    torch.manual_seed(0)
    attn = MoHAttention(H * 4, H, 2, 3).eval()
    x = torch.randn(2, 1, H * 4)
    with torch.no_grad():
        expected = attn(x).output
        monkeypatch.setattr(
            graphheads.routed,
            "choose_execution",
            lambda *a, **kw: ExecutionChoice(path, "test", "chunked"),
        )
        out = attn(x).output
    assert calls == {"dense": [], "sparse": ["sparse_routed_attention"],
                     "decode": ["routed_decode_attention"]}[path]  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_the_module_answers_for_its_settings():
    attn = MoHAttention(H * 4, H, 2, 2, execution="sparse")
    x = torch.randn(2, 5, H * 4)
    assert attn.choose_execution(x, SMALL, 4).path == "sparse"  # autograd on
    with torch.no_grad():
        assert attn.choose_execution(x[:, :1], SMALL, 4).path == "decode"
        attn.execution = "auto"
        assert attn.choose_execution(x[:, :1], LARGE, 4).path == "dense"  # eager


def test_routers_get_every_heads_queries_wherever_the_path_projects_them():
    """A router that reads ``queries`` without declaring ``parameter_free`` (a wrapper
    of MoH's parameter-free router) gets them on the dense and decode paths, as before
    the policy; the sparse path, which projects only the active heads, passes ``None``."""
    from torch import nn

    from graphheads import MoHRouter
    from graphheads.routed import RoutedAttention

    class Wrapped(nn.Module):  # hides parameter_free
        def __init__(self):
            super().__init__()
            self.inner = MoHRouter(H * 4, H, 2, 3, parameter_free=True)
            self.num_heads, self.seen = H, []

        def forward(self, x, *, queries=None, head_states=None, padding_mask=None):
            self.seen.append(queries is not None)
            if queries is None:  # the sparse path: route from the inputs alone
                queries = x.new_ones(*x.shape[:2], H, 4)
            return self.inner(x, queries=queries, padding_mask=padding_mask)

    attn = RoutedAttention(H * 4, H, router=Wrapped()).eval()
    x = torch.randn(2, 5, H * 4)
    with torch.no_grad():
        attn(x)  # dense
        attn(x[:, :1])  # one-token, eager auto: dense
        attn.execution = "sparse"
        attn(x[:, :1])  # decode
        attn(x)  # sparse
    assert attn.router.seen == [True, True, True, False]
