"""A small ViT on real images that ship offline (scikit-learn's 8x8 digits) with MHA,
MoH and GoH heads, in the spirit of MoH-ViT (Jin et al. 2024).

The ViT is plain PyTorch (patch embedding, class token, ``nn.TransformerEncoder``);
MoH and GoH variants are the same model after ``graphheads.route_heads`` (MoH's linear
router or the graph-router in every layer), trained from scratch with the load-balance
loss (weight 0.01, collected with ``record_routing``). Test accuracy on a fixed held-out
fifth of the images, per seed; the routing figure shows, for one test image, which
heads each patch uses in the last layer of the seed-0 GoH model at 50% heads.

    python benchmarks/vision_digits.py                        # 3 seeds, every variant
    python benchmarks/vision_digits.py --seeds 0 --epochs 5   # a quick look

Writes ``docs/img/vision_digits.json`` and ``docs/img/vision_patch_routing.png`` (both
replaced whole at the end, never half-written).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from graphheads import record_routing, route_heads, viz

D, HEADS, SHARED, LAYERS, PATCH = 64, 8, 2, 4, 2
GRID = 8 // PATCH
# name -> (router, top_k): 2 shared + top_k routed of the 6 routed heads
VARIANTS = {
    "MHA": (None, None),
    "MoH 75%": ("moh", 4),
    "GoH 75%": ("goh", 4),
    "MoH 50%": ("moh", 2),
    "GoH 50%": ("goh", 2),
}
OUT = Path(__file__).resolve().parent.parent / "docs" / "img"


class TinyViT(nn.Module):
    """8x8 images -> 2x2 patches (16 tokens) + a class token -> 4 pre-norm encoder layers."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(PATCH * PATCH, D)
        self.cls = nn.Parameter(torch.zeros(1, 1, D))
        self.pos = nn.Parameter(0.02 * torch.randn(1, GRID * GRID + 1, D))
        layer = nn.TransformerEncoderLayer(
            D, HEADS, dim_feedforward=2 * D, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.size(0)
        patches = images.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # (b, 4, 4, 2, 2)
        x = self.patch(patches.reshape(b, GRID * GRID, PATCH * PATCH))
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    return images[train], labels[train], images[test], labels[test]


def build(variant: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyViT()
    router, top_k = VARIANTS[variant]
    if router is not None:
        route_heads(model, num_shared=SHARED, top_k=top_k, router=router)
    return model


def train(variant: str, seed: int, epochs: int) -> tuple[nn.Module, float, float]:
    x_train, y_train, x_test, y_test = data()
    model = build(variant, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * ((len(y_train) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(y_train), generator=gen).split(64):
            with record_routing(model) as routing:
                loss = F.cross_entropy(model(x_train[rows]), y_train[rows])
            if routing:
                loss = loss + 0.01 * sum(r.load_balance_loss for r in routing) / len(routing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return model, accuracy, time.perf_counter() - start


def write_atomically(path: Path, write) -> None:  # type: ignore[no-untyped-def]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the JSON and figure")
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    figure_model = None
    for variant in VARIANTS:
        for seed in args.seeds:
            model, accuracy, took = train(variant, seed, args.epochs)
            results.setdefault(variant, []).append(accuracy)
            seconds.setdefault(variant, []).append(took)
            print(f"{variant:8s} seed {seed}: test accuracy {accuracy:.4f} ({took:.0f} s)")
            if variant == "GoH 50%" and seed == args.seeds[0]:
                figure_model = model
    print("\n| model | active heads | test accuracy (mean ± std over seeds) | s per run |")
    print("| --- | --- | --- | --- |")
    for variant, accs in results.items():
        router, top_k = VARIANTS[variant]
        active = HEADS if router is None else SHARED + top_k
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mean_s = statistics.mean(seconds[variant])
        print(
            f"| {variant} | {active}/{HEADS} | {statistics.mean(accs):.4f} ± {spread:.4f} | "
            f"{mean_s:.0f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"epochs": args.epochs, "seeds": args.seeds, "accuracy": results}
    write_atomically(
        args.out / "vision_digits.json", lambda p: Path(p).write_text(json.dumps(record, indent=2))
    )
    if figure_model is not None:
        _, _, x_test, y_test = data()
        with torch.no_grad(), record_routing(figure_model) as routing:
            figure_model(x_test[:1])
        gates = routing[-1].gates[0, 1:]  # last layer, patches only (no class token)
        fig = viz.plot_patch_routing(
            gates,
            (GRID, GRID),
            image=x_test[0],
            num_shared=SHARED,
            title=f"GoH 50% heads, last layer: heads used by each 2x2 patch (digit {y_test[0]})",
        )
        write_atomically(args.out / "vision_patch_routing.png", lambda p: fig.savefig(p, dpi=120))


if __name__ == "__main__":
    main()
