"""Task-conditioned routing: a learned task embedding added to every router's input."""

import pytest
import torch

from graphheads import DecoderOnlyLM, ModelConfig
from graphheads.data import TaskSuite
from graphheads.train import RunConfig, Trainer
from graphheads.train.evaluation import forward_batch


def lm(**overrides) -> DecoderOnlyLM:
    torch.manual_seed(0)
    values = {"vocab_size": 30, "attention": "goh", "num_shared": 1, "task_embeddings": 3}
    return DecoderOnlyLM(ModelConfig(**{**values, **overrides})).eval()


def test_router_input_is_the_attention_input_plus_the_task_embedding():
    model = lm()
    with torch.no_grad():
        model.task_embedding.weight.normal_()
    seen = {}
    attn = model.decoder.layers[1].self_attn
    attn.register_forward_pre_hook(
        lambda m, args, kw: seen.update(attn_in=args[0]), with_kwargs=True
    )
    attn.router.register_forward_pre_hook(lambda m, args: seen.update(router_in=args[0]))
    tokens, tasks = torch.randint(0, 30, (2, 7)), torch.tensor([2, 0])
    model(tokens, task_ids=tasks)
    expected = seen["attn_in"] + model.task_embedding.weight[tasks].unsqueeze(1)
    torch.testing.assert_close(seen["router_in"], expected)


def test_zero_embeddings_route_as_without_them_and_learned_ones_move_the_routing():
    model = lm()
    tokens = torch.randint(0, 30, (2, 7))
    plain = model(tokens)
    zero = model(tokens, task_ids=torch.tensor([1, 2]))  # zero at init
    torch.testing.assert_close(zero.logits, plain.logits, atol=0, rtol=0)
    with torch.no_grad():
        model.task_embedding.weight.normal_(std=3.0)
    a = model(tokens, task_ids=torch.tensor([0, 0])).routing[0].gates
    b = model(tokens, task_ids=torch.tensor([1, 1])).routing[0].gates
    assert not torch.allclose(a, b)


def test_bad_task_routing_inputs_are_named():
    with pytest.raises(ValueError, match="task_embeddings"):
        ModelConfig(vocab_size=30, attention="mha", task_embeddings=2)
    with pytest.raises(ValueError, match="task_embeddings"):
        ModelConfig(vocab_size=30, attention="goh", task_embeddings=-1)
    with pytest.raises(ValueError, match="no task embedding"):
        lm(task_embeddings=0)(torch.zeros(1, 3, dtype=torch.long), task_ids=torch.zeros(1).long())
    attn = lm().decoder.layers[0].self_attn
    with pytest.raises(ValueError, match="router_context"):
        attn(torch.randn(2, 5, 64), router_context=torch.randn(3, 64))
    run = RunConfig.from_dict({"model": {"attention": "goh", "task_embeddings": 2}})
    with pytest.raises(ValueError, match="number of tasks"):
        Trainer(run, progress=False)


def test_multi_task_training_passes_each_rows_task():
    suite = TaskSuite(("copy", "reverse", "sort"))
    model = lm(vocab_size=suite.vocab_size, max_seq_len=suite.max_seq_len)
    with torch.no_grad():
        model.task_embedding.weight.normal_(std=3.0)
    batch = suite.sample(4, torch.Generator().manual_seed(0))
    out, _ = forward_batch(model, batch)
    direct = model(batch.inputs, key_padding_mask=batch.padding, task_ids=batch.task_ids)
    torch.testing.assert_close(out.logits, direct.logits)
    wrong = model(batch.inputs, key_padding_mask=batch.padding, task_ids=batch.task_ids.flip(0))
    assert not torch.allclose(out.logits, wrong.logits)


def test_report_coactivation_per_task_uses_each_tasks_id():
    """The report's per-task co-activation graphs are those of the task's batch, routed
    with the task's embedding (an oracle: the graph of a direct forward pass)."""
    from graphheads.report import task_coactivation
    from graphheads.viz import coactivation_graph

    suite = TaskSuite(("copy", "reverse", "sort"))
    model = lm(vocab_size=suite.vocab_size, max_seq_len=suite.max_seq_len)
    with torch.no_grad():
        model.task_embedding.weight.normal_(std=5.0)
    graphs = task_coactivation(model, suite, batch_size=8, seed=3)
    gen = torch.Generator().manual_seed(3)
    for task in suite.tasks:
        batch = suite.sample(8, gen, task=task)
        out = model(batch.inputs, key_padding_mask=batch.padding, task_ids=batch.task_ids)
        expected = coactivation_graph(out.routing[1], padding_mask=batch.targets == -100)
        got = graphs[task][1]
        assert sorted(got.edges(data="weight")) == sorted(expected.edges(data="weight"))
    weights = [sorted(graphs[t][0].edges(data="weight")) for t in suite.tasks]
    assert weights[0] != weights[1]  # tasks route differently
