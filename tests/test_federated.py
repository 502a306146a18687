"""Federated training with Flower's simulation runtime (the federated extra; CI installs
it): FedAvg's aggregate is the example-weighted mean of the clients' weights, a failing
client is left out of its round, personal routers stay with their clients, a restarted
server continues from its last round exactly as an uninterrupted run, clients return
everything in messages, and `flwr run` on the app folder writes what `graphheads
federated` writes."""

import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="needs the federated extra (flwr[simulation])")

from graphheads.integrations.federated import FederatedConfig, client_tasks, run_federated

pytestmark = pytest.mark.slow

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


def test_fedavg_aggregate_is_the_example_weighted_mean_and_a_failing_client_is_left_out(
    tmp_path, capfd
):
    config = FederatedConfig(rounds=2, local_steps=3, batch_size=8, eval_batches=1,
                             eval_batch_size=8, model=TINY, save_clients=True,
                             fail_client=1)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = run_federated(config, tmp_path)
    printed = "".join(capfd.readouterr())
    assert "run_simulation" not in printed and "FutureWarning" not in printed
    deprecations = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
    assert not [(w.category, w.filename, str(w.message)) for w in caught
                if issubclass(w.category, deprecations)
                and ("flwr" in w.filename or "ray" in w.filename)]  # fmt: skip
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


def test_personal_routers_stay_local_and_a_restarted_server_resumes_exactly(tmp_path):
    """Interrupted after round 1 and continued, the run equals one made in one go: the
    restarted clients have no Flower node state, so their routers come back from the
    server's checkpoint in the first round's message."""
    base = {"local_steps": 3, "batch_size": 8, "eval_batches": 1, "eval_batch_size": 8,
            "model": TINY, "save_clients": True, "mode": "personal"}  # fmt: skip
    run_federated(FederatedConfig(rounds=1, **base), tmp_path / "resumed")
    round1 = (tmp_path / "resumed" / "client0_round1.pt").read_bytes()
    records = run_federated(FederatedConfig(rounds=2, **base), tmp_path / "resumed")
    assert [r["round"] for r in records] == [1, 2]
    assert (tmp_path / "resumed" / "client0_round1.pt").read_bytes() == round1  # not redone
    at_once = run_federated(FederatedConfig(rounds=2, **base), tmp_path / "at_once")
    assert records == at_once  # the same accuracies and head usage, every round
    final, reference = (
        load(tmp_path / "resumed" / "global.pt"),
        load(tmp_path / "at_once" / "global.pt"),
    )
    for n, t in reference["state"].items():
        assert torch.equal(final["state"][n], t), n
    assert not any(".router." in n for n in final["state"])  # routers are never averaged
    clients = [load(tmp_path / "resumed" / f"client{c}_round2.pt") for c in (0, 1)]
    routers = [{n: t for n, t in c["state"].items() if ".router." in n} for c in clients]
    assert routers[0] and any(not torch.equal(routers[0][n], routers[1][n]) for n in routers[0])
    for c in (0, 1):  # the checkpoint holds each client's own latest routers
        for n, t in routers[c].items():
            assert torch.equal(final["kept"][c][n], t)
            assert torch.equal(reference["kept"][c][n], t)
    weights = [c["examples"] for c in clients]
    expected = weighted_mean([c["state"] for c in clients], weights, list(final["state"]))
    for n, t in final["state"].items():
        torch.testing.assert_close(t.float(), expected[n], atol=1e-6, rtol=1e-5)
    lines = (tmp_path / "resumed" / "rounds.jsonl").read_text().splitlines()
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
    with pytest.raises(
        ValueError, match=r"another configuration \(changed: mode 'fedavg' -> 'local'\).*--restart"
    ):
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
    torch.save({**load(tmp_path / "global.pt"), "round": 3}, tmp_path / "global.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"holds 3 rounds already; rounds \(2\) may only grow"):
        run_federated(FederatedConfig(**{**asdict(config), "rounds": 2}), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


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


def test_the_run_config_round_trips_and_the_app_folder_holds_the_same_defaults(tmp_path):
    """`flwr run` reads FederatedConfig from the app folder's [tool.flwr.app.config]: the
    same keys and defaults, the components that run_federated runs, and bad values named."""
    import tomllib

    from graphheads.integrations.federated.run import APP_DIR, CLIENT_APP, SERVER_APP

    config = FederatedConfig(mode="personal", proximal_mu=0.5, model=TINY, rounds=4)
    assert FederatedConfig.from_run_config(config.run_config(tmp_path)) == (config, tmp_path)
    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    defaults = FederatedConfig().run_config(Path.home() / ".graphheads" / "federated")
    assert {k: v for k, v in app["config"].items() if k != "restart"} == {
        **defaults, "out-dir": "~/.graphheads/federated"}  # fmt: skip
    assert FederatedConfig.from_run_config(app["config"])[1].is_absolute()
    with pytest.raises(ValueError, match="'model' must be a JSON object"):
        FederatedConfig.from_run_config({**config.run_config(tmp_path), "model": "{d_model: 3"})
    with pytest.raises(ValueError, match="absolute path, got 'runs/x'"):
        FederatedConfig.from_run_config(config.run_config("runs/x"))
    with pytest.raises(ValueError, match=r"run config local-steps must be an int, got 2\.5"):
        FederatedConfig.from_run_config({**config.run_config(tmp_path), "local-steps": 2.5})
    with pytest.raises(ValueError, match="no 'local-steps'"):  # one key missing
        FederatedConfig.from_run_config(
            {k: v for k, v in config.run_config(tmp_path).items() if k != "local-steps"}
        )


def _message(content, monkeypatch):
    """A Flower message as a ServerApp's grid would deliver it (Flower stamps messages
    with the identity of the task that makes them)."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    return Message(content=content, dst_node_id=2, message_type="train")


def test_a_client_trains_from_its_messages_alone_and_writes_no_file(tmp_path, monkeypatch):
    """Clients return what they trained in their reply (shared arrays, and the weights
    they keep for the server's checkpoint); nothing is written: no shared file system."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from graphheads.integrations.federated import client_app, new_model, sent_names

    monkeypatch.chdir(tmp_path)
    config = FederatedConfig(mode="personal", local_steps=1, batch_size=4, model=TINY)
    model = new_model(config)
    shared = {n: model.state_dict()[n] for n in sent_names(model, config.mode)}
    settings = ConfigRecord({"server-round": 1, "round-offset": 0, "proximal-mu": 0.0})
    message = _message(RecordDict({"arrays": ArrayRecord(torch_state_dict=shared),
                                   "config": settings}), monkeypatch)  # fmt: skip
    nodes = {"partition-id": 1, "num-partitions": 2}
    context = Context(run_id=1, node_id=2, node_config=nodes, state=RecordDict(),
                      run_config=config.run_config(tmp_path / "server"))  # fmt: skip
    reply = client_app(message, context).content
    assert list(tmp_path.iterdir()) == []  # not even the server's folder
    assert set(reply["arrays"].to_torch_state_dict()) == set(shared)
    assert not any(".router." in n for n in shared)
    from graphheads.integrations.federated.app import _from_bytes

    kept = _from_bytes(reply["client"]["kept"])
    assert int(reply["client"]["partition-id"]) == 1
    assert kept and all(".router." in n or not t.is_floating_point() for n, t in kept.items())
    trained = context.state["kept"].to_torch_state_dict()  # kept for its next round too
    assert all(torch.equal(trained[n], t) for n, t in kept.items())
    assert int(reply["metrics"]["num-examples"]) == 2 * 1 * 4  # 2 tasks x 1 step x 4
    context.node_config["num-partitions"] = 3  # a federation of another size: named
    with pytest.raises(ValueError, match="3 SuperNodes but the run config says num-clients = 2"):
        client_app(message, context)


class _Grid:  # the two SuperNodes a simulation federation has
    def get_node_ids(self):
        return [5, 6]


class _Reply:  # what the strategy reads of a client's reply
    def __init__(self, node, client=None, kept=None, error=None):
        from graphheads.integrations.federated.app import _to_bytes

        self.metadata = type("Metadata", (), {"src_node_id": node})()
        self.error = type("Error", (), {"reason": error})()
        self.content = {"client": {"partition-id": client, "kept": _to_bytes(kept or {})}}

    def has_error(self):
        return self.error.reason is not None


def test_fedprox_is_flowers_own_and_a_restart_sends_each_client_its_own_weights(
    tmp_path, monkeypatch
):
    """After a restart each client gets back its own kept weights, and only its own,
    until it has trained again (a client that fails that round gets them next round)."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg, FedProx

    from graphheads.integrations.federated.app import _from_bytes, strategy_for

    _message(RecordDict(), monkeypatch)  # the task identity a ServerApp has
    kept = {0: {"a": torch.ones(2)}, 1: {"a": torch.zeros(2)}}
    arrays = ArrayRecord(torch_state_dict={"w": torch.ones(1)})
    plain = strategy_for(FederatedConfig(), tmp_path, 0, {})
    assert isinstance(plain, FedAvg) and not isinstance(plain, FedProx)
    strategy = strategy_for(FederatedConfig(proximal_mu=0.5), tmp_path, 3, kept)
    assert isinstance(strategy, FedProx)
    strategy.partitions = {5: 0, 6: 1}  # what ask_partitions learns from the SuperNodes

    def sent(messages):
        return {m.metadata.dst_node_id: sorted(m.content["kept"].keys()) if "kept" in m.content
                else [] for m in messages}  # fmt: skip

    first = strategy.configure_train(1, arrays, ConfigRecord(), _Grid())
    assert sent(first) == {5: ["client0"], 6: ["client1"]}
    assert all(m.content["config"]["proximal-mu"] == 0.5 for m in first)  # the clients' term
    to_1 = next(m for m in first if m.metadata.dst_node_id == 6)
    assert torch.equal(_from_bytes(to_1.content["kept"]["client1"])["a"], torch.zeros(2))
    assert sent(strategy.configure_evaluate(1, arrays, ConfigRecord(), _Grid())) == sent(first)
    trained = {"a": torch.full((2,), 7.0)}  # client 0 trained; client 1 failed
    order = strategy.collect([_Reply(6, error="client 1 fails"), _Reply(5, 0, trained)])
    assert [r.metadata.src_node_id for r in order] == [5]
    assert torch.equal(strategy.kept[0]["a"], trained["a"])
    assert sent(strategy.configure_train(2, arrays, ConfigRecord(), _Grid())) == {
        5: [], 6: ["client1"]}  # fmt: skip
    order = strategy.collect([_Reply(6, 1, kept[1]), _Reply(5, 0, trained)])
    assert [r.metadata.src_node_id for r in order] == [5, 6]  # client order, not arrival
    assert sent(strategy.configure_train(3, arrays, ConfigRecord(), _Grid())) == {5: [], 6: []}
    with pytest.raises(RuntimeError, match="every client failed this round"):
        strategy.collect([_Reply(5, error="boom"), _Reply(6, error="boom")])


def test_settings_from_a_run_config_are_checked_by_type(tmp_path):
    """flwr run passes any TOML value: a wrong type is named, not met deep in training."""
    from graphheads.integrations.federated.config import restart_flag

    for bad in ({"local_steps": 2.5}, {"rounds": True}, {"lr": "0.01"}, {"lr": 0},
                {"proximal_mu": float("nan")}, {"save_clients": "no"}):  # fmt: skip
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"FederatedConfig: {name} must be"):
            FederatedConfig(**bad)
    assert FederatedConfig(lr=1).lr == 1.0 and isinstance(FederatedConfig(lr=1).lr, float)
    assert restart_flag({"restart": True}) and not restart_flag({})
    with pytest.raises(ValueError, match="'restart' must be true or false, got 'false'"):
        restart_flag({"restart": "false"})  # a string would have read as true: deleting


def test_a_folder_of_the_previous_version_resumes_with_its_clients_kept_weights(tmp_path):
    from graphheads.integrations.federated.app import _saved_run

    config = FederatedConfig(model=TINY)
    model = new_model_for(config)
    state = {n: t for n, t in model.state_dict().items() if t.is_floating_point()}
    torch.save({"round": 2, "state": state}, tmp_path / "global.pt")  # no "kept" in it
    torch.save({"state": {"w": torch.ones(3)}}, tmp_path / "client1_kept.pt")
    start, _, kept = _saved_run(tmp_path, model)
    assert start == 2 and list(kept) == [1] and torch.equal(kept[1]["w"], torch.ones(3))


def new_model_for(config):
    from graphheads.integrations.federated import new_model

    return new_model(config)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FLWR = Path(sys.executable).with_name("flwr")


@pytest.mark.skipif(not FLWR.exists(), reason="needs Flower's flwr command beside python")
def test_flwr_run_on_the_app_folder_writes_what_graphheads_federated_writes(tmp_path):
    """The way Flower users run an app: `flwr run` on the app folder, on the local
    simulation federation (Flower starts its own SuperLink: here on free ports, with its
    home in tmp_path, stopped afterwards). Same seed, same settings: the same
    rounds.jsonl and aggregate as run_federated's in-process run."""
    from graphheads.integrations.federated import APP_DIR

    config = FederatedConfig(rounds=2, local_steps=2, batch_size=8, eval_batches=1,
                             eval_batch_size=8, model=TINY, mode="personal")  # fmt: skip
    overrides = tmp_path / "run-config.toml"  # a TOML file: --run-config takes one
    overrides.write_text("".join(
        f"{k} = {json.dumps(v)}\n" for k, v in config.run_config(tmp_path / "flwr").items()
    ))  # fmt: skip
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home),  # flwr starts flower-superlink from PATH
           "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}  # fmt: skip
    command = [str(FLWR), "run", str(APP_DIR), "--stream",
               "--federation-config", f"num-supernodes={config.num_clients}",
               "--run-config", str(overrides)]  # fmt: skip
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:  # the SuperLink that `flwr run` left running for later runs
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(home).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                pass
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run_simulation" not in done.stdout + done.stderr
    records = run_federated(config, tmp_path / "in_process")
    assert [r["round"] for r in records] == [1, 2]
    assert (tmp_path / "flwr" / "rounds.jsonl").read_text() == (
        tmp_path / "in_process" / "rounds.jsonl").read_text()  # fmt: skip
    ours, theirs = (
        load(tmp_path / "in_process" / "global.pt"),
        load(tmp_path / "flwr" / "global.pt"),
    )
    assert all(torch.equal(t, theirs["state"][n]) for n, t in ours["state"].items())


def test_the_cli_names_the_app_folder_for_flwr_run(capsys):
    from graphheads.cli import main
    from graphheads.integrations.federated import APP_DIR

    assert main(["federated", "--app-dir"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == APP_DIR and (printed / "pyproject.toml").is_file()


def test_the_server_waits_for_the_federation_to_register_before_counting_it():
    from graphheads.integrations.federated.app import _federation_size

    class Registering:  # no SuperNode at first, then all of them
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [] if self.calls < 3 else [5, 6, 7]

    assert _federation_size(Registering()) == 3
