"""Federated training with Flower's simulation runtime (the federated extra; CI installs
it): FedAvg's aggregate is the example-weighted mean of the clients' weights, a failing
client is left out of its round, personal routers stay with their clients, and a
restarted server continues from its last round."""

import json
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("flwr", reason="needs the federated extra (flwr[simulation])")

from graphheads.integrations.federated import FederatedConfig, client_tasks, run_federated

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]  # fmt: skip

TINY = {"d_model": 32, "d_ff": 64}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def weighted_mean(states, weights, names):
    total = sum(weights)
    return {n: sum(s[n].float() * w for s, w in zip(states, weights, strict=True)) / total
            for n in names}  # fmt: skip


def test_non_iid_split_gives_each_client_its_own_tasks():
    assert client_tasks(0, 2) == ("copy", "sort", "modadd")
    assert client_tasks(1, 2) == ("reverse", "mqar")
    with pytest.raises(ValueError, match="mode"):
        FederatedConfig(mode="fedsgd")


@pytest.mark.parametrize("weights", [[2.0, 1.0], [1.0, 1.0, 1.0]])
def test_aggregation_never_touches_the_head_graphs_edges(weights):
    """Flower's own FedAvg aggregation at 2:1 (one failed client of three) and 1:1:1: the
    head graph's integer edge_index never travels, so it comes back bit-identical (before,
    its float64 mean was truncated on loading: 14 of 56 edges moved at 2:1)."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from graphheads.integrations.federated import new_model, shared_names

    config = FederatedConfig(model=TINY)
    clients = []
    for seed in range(len(weights)):  # clients that trained apart: different floats
        model = new_model(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        clients.append(model)
    replies = [
        RecordDict({"arrays": ArrayRecord(torch_state_dict={n: m.state_dict()[n]
                                                            for n in shared_names(m, "fedavg")}),
                    "metrics": MetricRecord({"num-examples": w})})
        for m, w in zip(clients, weights, strict=True)
    ]  # fmt: skip
    incoming = aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict()
    receiver = new_model(config)  # loads the aggregate as a client does
    state = receiver.state_dict()
    state.update({n: incoming[n] for n in shared_names(receiver, "fedavg")})
    receiver.load_state_dict(state)
    reference = new_model(config).state_dict()
    edges = [n for n in reference if n.endswith("edge_index")]
    moved = [n for n in edges if not torch.equal(receiver.state_dict()[n], reference[n])]
    assert edges and not moved, moved
    assert not any("edge_index" in n for n in incoming)
    names = list(incoming)
    expected = weighted_mean([m.state_dict() for m in clients], weights, names)
    for n in names:
        torch.testing.assert_close(receiver.state_dict()[n], expected[n], atol=1e-6, rtol=1e-5)


def test_fedavg_aggregate_is_the_example_weighted_mean_and_a_failing_client_is_left_out(tmp_path):
    config = FederatedConfig(rounds=2, local_steps=3, batch_size=8, eval_batches=1,
                             eval_batch_size=8, model=TINY, save_clients=True,
                             fail_client=1)  # fmt: skip
    records = run_federated(config, tmp_path)
    assert [r["round"] for r in records] == [1, 2]
    final = load(tmp_path / "global.pt")
    assert final["round"] == 2
    # round 1: client 1 failed, so the aggregate is client 0's weights alone
    round1 = load(tmp_path / "global_round1.pt")["state"]
    client0 = load(tmp_path / "client0_round1.pt")["state"]
    assert round1.keys() and all(torch.equal(t, client0[n]) for n, t in round1.items())
    # round 2: both, weighted by examples (client 0 holds 3 tasks, client 1 holds 2)
    clients = [load(tmp_path / f"client{c}_round2.pt") for c in (0, 1)]
    weights = [c["examples"] for c in clients]
    assert weights == [3 * 3 * 8, 2 * 3 * 8]
    names = list(final["state"])
    assert any(".router." in n for n in names)  # fedavg shares the routers too
    expected = weighted_mean([c["state"] for c in clients], weights, names)
    for n in names:
        torch.testing.assert_close(final["state"][n].float(), expected[n], atol=1e-6, rtol=1e-5)
    assert 0.0 <= records[-1]["accuracy"] <= 1.0 and "accuracy-client1" in records[-1]


def test_personal_routers_stay_local_and_a_restarted_server_resumes(tmp_path):
    base = {"local_steps": 3, "batch_size": 8, "eval_batches": 1, "eval_batch_size": 8,
            "model": TINY, "save_clients": True, "mode": "personal"}  # fmt: skip
    run_federated(FederatedConfig(rounds=1, **base), tmp_path)
    round1 = (tmp_path / "client0_round1.pt").read_bytes()
    records = run_federated(FederatedConfig(rounds=2, **base), tmp_path)  # restart
    assert [r["round"] for r in records] == [1, 2]
    assert (tmp_path / "client0_round1.pt").read_bytes() == round1  # not trained again
    final = load(tmp_path / "global.pt")
    assert not any(".router." in n for n in final["state"])  # routers never leave clients
    clients = [load(tmp_path / f"client{c}_round2.pt") for c in (0, 1)]
    routers = [{n: t for n, t in c["state"].items() if ".router." in n} for c in clients]
    assert routers[0] and any(not torch.equal(routers[0][n], routers[1][n]) for n in routers[0])
    kept = load(tmp_path / "client0_kept.pt")["state"]
    for n, t in kept.items():  # each client's kept router is its own latest one
        assert torch.equal(t, clients[0]["state"][n])
    weights = [c["examples"] for c in clients]
    expected = weighted_mean([c["state"] for c in clients], weights, list(final["state"]))
    for n, t in final["state"].items():
        torch.testing.assert_close(t.float(), expected[n], atol=1e-6, rtol=1e-5)
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    # each line holds the evaluation of its own round (the clients say which)
    assert all("accuracy-client0" in json.loads(x) for x in lines)


def test_a_run_of_another_configuration_is_refused_before_anything_is_written(tmp_path):
    """As `train` and `continual` do: continuing a folder with other settings (here
    another mode) would mix two runs in rounds.jsonl; only `rounds` may grow."""
    from graphheads.integrations.federated import CONFIG_NAME

    (tmp_path / CONFIG_NAME).write_text(json.dumps(asdict(FederatedConfig(mode="fedavg"))))
    (tmp_path / "global.pt").write_bytes(b"round 3")
    (tmp_path / "rounds.jsonl").write_text('{"round": 1}\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"another configuration \(changed: mode\).*--restart"):
        run_federated(FederatedConfig(mode="local", rounds=5), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / CONFIG_NAME).unlink()  # run files with no settings to check: refused too
    with pytest.raises(ValueError, match=r"no federated.json to check them against"):
        run_federated(FederatedConfig(mode="local"), tmp_path)
    config = FederatedConfig(mode="local", rounds=1, local_steps=1, batch_size=8,
                             eval_batches=1, eval_batch_size=8, model=TINY)  # fmt: skip
    records = run_federated(config, tmp_path, restart=True)  # starts over
    assert [r["round"] for r in records] == [1]
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["mode"] == "local"


def test_fedprox_term_pulls_local_training_towards_the_global_weights():
    """FedProx: mu / 2 * ||w - w_global||^2; a large mu keeps the local weights much
    closer to the anchor than plain training does."""
    from graphheads.data.tasks import TaskSuite
    from graphheads.integrations.federated import local_train, new_model

    suite = TaskSuite(client_tasks(0, 2))
    config = FederatedConfig(model=TINY)
    drift = {}
    for mu in (0.0, 100.0):
        model = new_model(config)
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        local_train(model, suite, steps=20, batch_size=8, lr=1e-2, anchor=anchor,
                    proximal_mu=mu, generator=torch.Generator().manual_seed(0))  # fmt: skip
        drift[mu] = sum((p - anchor[n]).square().sum() for n, p in model.named_parameters())
    assert drift[100.0] < 0.2 * drift[0.0]
