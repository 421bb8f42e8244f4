"""A small study of the LLC over training, on CPU in a few minutes.

    .venv/bin/python examples/grokking_or_stages.py --out examples/out

Trains an MLP on modular addition (a + b mod 23, half the pairs for training, full-batch AdamW with weight
decay 1, which memorises within ~100 steps and generalises (groks) between steps 3000 and 6000),
saves checkpoints along the way, then runs ``llc_fast.estimate_over_checkpoints`` on them with per-layer
restricted LLCs and the perturbation probe at every checkpoint (same seeds everywhere: differences between
checkpoints are not sampling noise). Writes, under --out:

* ``llc_over_training.png``: lambda_hat (full and per layer) against the training step, ± 2 SE, with the
  train and test accuracy of each checkpoint;
* ``llc_per_layer.png``: the [checkpoint x layer] heat map;
* ``probe.png``: the perturbation probe's Delta L(eps) at the first and last checkpoints;
* ``sweep.json``, ``table.csv``: the numbers. Rerunning skips every estimate already done.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import llc_fast

P = 23


def dataset(seed: int = 0):
    a, b = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    y = (x[:, 0] + x[:, 1]) % P
    perm = torch.randperm(P * P, generator=torch.Generator().manual_seed(seed))
    half = P * P // 2
    return (x[perm[:half]], y[perm[:half]]), (x[perm[half:]], y[perm[half:]])


class ModAdd(nn.Module):
    """Embeddings of a and b, concatenated, through a two-layer MLP to logits over the P residues."""

    def __init__(self, dim: int = 32, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(P, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, P))

    def forward(self, x):
        return self.mlp(self.embed(x).reshape(x.shape[0], -1))


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def accuracy(model, data) -> float:
    with torch.no_grad():
        return float((model(data[0]).argmax(-1) == data[1]).float().mean())


def train(out: Path, steps: list[int], seed: int = 0) -> dict[int, dict]:
    """Full-batch AdamW; saves the state dict at each of ``steps``; returns the accuracies per step."""
    torch.manual_seed(seed)
    train_data, test_data = dataset(seed)
    model = ModAdd()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0)
    stats = {}
    for t in range(max(steps) + 1):
        if t in steps:
            torch.save(model.state_dict(), out / "checkpoints" / f"step_{t}.pt")
            stats[t] = dict(train=accuracy(model, train_data), test=accuracy(model, test_data))
        opt.zero_grad()
        loss_fn(model, train_data).backward()
        opt.step()
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="examples/out")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 50, 200, 1000, 2000, 3000, 4000, 5000, 6000])
    ap.add_argument("--draws", type=int, default=800, help="draws per chain (after 500 burn-in steps)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stats = train(out, args.steps)
    print(f"trained in {time.perf_counter() - t0:.1f} s; accuracy (train, test) per step: "
          + ", ".join(f"{s}: {v['train']:.2f}/{v['test']:.2f}" for s, v in stats.items()), flush=True)

    train_data, _ = dataset(0)
    batches = [(train_data[0][i:i + 66], train_data[1][i:i + 66]) for i in range(0, 264, 66)]
    n = len(train_data[1])
    t1 = time.perf_counter()
    result = llc_fast.estimate_over_checkpoints(
        out / "checkpoints", batches, loss_fn, model=ModAdd(), save_dir=out / "estimates",
        components={"full": None, "embed": ["embed.*"], "layer 1": ["mlp.0.*"], "layer 2": ["mlp.2.*"]},
        probe=dict(radii=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], num_samples=32, kind="gaussian"),
        lr=1e-3, nbeta=n / torch.log(torch.tensor(float(n))).item(), gamma=100.0, num_chains=4, num_draws=args.draws,
        num_burnin_steps=500, seed=0, progress=False)
    print(f"sampled {len(result.rows)} estimates in {time.perf_counter() - t1:.1f} s", flush=True)
    print(result.table(), flush=True)
    result.save(out / "sweep.json")
    result.to_csv(out / "table.csv")

    fig = result.plot(None)
    ax = fig.axes[0]
    ax.set_xscale("symlog", linthresh=50)
    twin = ax.twinx()
    steps = sorted(stats)
    twin.plot(steps, [stats[s]["train"] for s in steps], "k:", lw=1, label="train accuracy")
    twin.plot(steps, [stats[s]["test"] for s in steps], "k--", lw=1, label="test accuracy")
    twin.set(ylabel="accuracy (train dotted, test dashed)", ylim=(0, 1.05))
    twin.legend(fontsize=7, loc="center right")
    ax.legend(fontsize=7, title="component", title_fontsize=7, loc="upper center")
    ax.set_xlabel("training step (symlog scale)")
    fig.tight_layout()
    fig.savefig(out / "llc_over_training.png", dpi=120)
    result.heatmap(out / "llc_per_layer.png")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, step in zip(axes, (steps[0], steps[-1])):
        result.probes[step].plot(None, ax=ax)
        ax.set_title(f"perturbation probe at step {step}")
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=120)
    print(f"plots and tables written to {out} ({time.perf_counter() - t0:.1f} s in all)", flush=True)


if __name__ == "__main__":
    main()
