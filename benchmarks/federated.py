"""Federated training on a non-IID split of the built-in tasks: per-client accuracy of
FedAvg, personalised routing (routers and head graphs stay local) and each client
alone, over several seeds (mean +/- std), on Flower's simulation runtime.

Two clients: client 0 holds copy, sort and modadd; client 1 reverse and mqar. Each
round a client trains 40 local steps per task it holds (batch 32); 5 rounds; the main
job's GoH model (width 64, 8 heads, 2 layers, 2 shared, top-3).

    python benchmarks/federated.py            # seeds 0 1 2 (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from graphheads.integrations.federated import FederatedConfig, run_federated

MODES = ("fedavg", "personal", "local")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=40)
    args = parser.parse_args()
    final: dict[str, list[dict]] = {m: [] for m in MODES}
    for mode in MODES:
        for seed in args.seeds:
            config = FederatedConfig(
                rounds=args.rounds, local_steps=args.local_steps, mode=mode, seed=seed
            )
            with tempfile.TemporaryDirectory() as out:
                final[mode].append(run_federated(config, out)[-1])
    print(f"\n{args.rounds} rounds, {args.local_steps} local steps per task, seeds {args.seeds}\n")
    print("| sharing | client 0 (copy, sort, modadd) | client 1 (reverse, mqar) | weighted |")
    print("| --- | --- | --- | --- |")
    for mode, runs in final.items():
        cells = []
        for key in ("accuracy-client0", "accuracy-client1", "accuracy"):
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} +/- {spread:.3f}")
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
