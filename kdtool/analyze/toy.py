"""The toy problem of the paper's appendix A.1 (Fig. 1): why batch statistics matter.

An MLP with two BatchNorm layers and a 2-D penultimate layer learns concentric circles.
Fed Gaussian noise with its BN layers on *running* statistics (classic KD), the noise
lands in a small region of the embedding, far from the real data; with the BN layers on
the noise batch's *current* statistics, the noise embedding spreads over the region the
real data occupies, so a student trained on it sees the teacher's whole decision surface.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdtool.analyze import pyplot, save_png
from kdtool.bn import batch_stats, bn_layers
from kdtool.evaluate import percent_equal
from kdtool.io import atomic_path


class ToyMLP(nn.Module):
    """2 -> hidden -> BN -> ReLU -> 2 -> BN (the 2-D embedding) -> ReLU -> classes."""

    def __init__(self, hidden: int = 32, classes: int = 2):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(2, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, 2), nn.BatchNorm1d(2)
        self.head = nn.Linear(2, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.embed(x)))


@dataclass
class ToyConfig:
    samples: int = 1000
    steps: int = 600
    noise_scale: float = 1.0  # std of the Gaussian noise inputs (the data lie within radius 1)
    seed: int = 0


SETS = ("real, running BN", "noise, running BN", "noise, current BN")


def run_toy(cfg: ToyConfig) -> dict:
    if not cfg.noise_scale > 0:  # a negative std draws the same noise mirrored: no meaning
        from kdtool.errors import KdtoolError

        raise KdtoolError(f"--noise-scale is a standard deviation and must be above 0, not "
                          f"{cfg.noise_scale:g}", "e.g. --noise-scale 1")
    # Full-batch steps on 1,000 points x 32 units are too small to split across threads: on
    # 2 cores the 600 steps took 1.9 s on one thread against 5-8 s on two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_toy(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_toy(cfg: ToyConfig) -> dict:
    from sklearn.datasets import make_circles

    torch.manual_seed(cfg.seed)
    x, y = make_circles(n_samples=cfg.samples, noise=0.05, factor=0.5, random_state=cfg.seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    model = ToyMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(cfg.steps):  # full batch: the running statistics converge to the data's
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise = torch.randn(cfg.samples, 2, generator=gen) * cfg.noise_scale
    with torch.no_grad():
        accuracy = percent_equal(model(x).argmax(1), y)
        emb = {SETS[0]: model.embed(x), SETS[1]: model.embed(noise)}
        pred = {SETS[0]: model(x).argmax(1), SETS[1]: model(noise).argmax(1)}
        with batch_stats(model, [m for _, m in bn_layers(model)]):
            emb[SETS[2]] = model.embed(noise)
            pred[SETS[2]] = model(noise).argmax(1)
    real = emb[SETS[0]].numpy()
    summary = {}
    for name, e in emb.items():
        e = e.numpy()
        summary[name] = {
            "embedding_mean": e.mean(0).round(4).tolist(),
            "embedding_std": e.std(0).round(4).tolist(),
            # how far the set sits from the real data: mean distance to the nearest real point
            "mean_distance_to_real": float(_nearest(e, real).mean()),
            "predicted_class_share": np.bincount(pred[name].numpy(), minlength=2).tolist(),
        }
    return {"inputs": {"real": x.numpy(), "labels": y.numpy(), "noise": noise.numpy()},
            "embeddings": {k: v.numpy() for k, v in emb.items()},
            "predictions": {k: v.numpy() for k, v in pred.items()},
            "train_accuracy": accuracy, "summary": summary}


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.sqrt(d.min(1))


def write_csv(path: Path, r: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["set", "space", "x", "y", "label_or_prediction"])
        for (px, py), label in zip(r["inputs"]["real"], r["inputs"]["labels"], strict=True):
            w.writerow(["real", "input", f"{px:.5f}", f"{py:.5f}", int(label)])
        for px, py in r["inputs"]["noise"]:
            w.writerow(["noise", "input", f"{px:.5f}", f"{py:.5f}", ""])
        for name, e in r["embeddings"].items():
            for (ex, ey), p in zip(e, r["predictions"][name], strict=True):
                w.writerow([name, "embedding", f"{ex:.5f}", f"{ey:.5f}", int(p)])


def write_png(path: Path, r: dict) -> None:
    from matplotlib.lines import Line2D

    plt = pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.6))
    cmap = plt.get_cmap("coolwarm")
    classes = [Line2D([], [], ls="", marker="o", color=cmap(v), label=f"class {k}")
               for k, v in ((0, 0.0), (1, 1.0))]
    real, labels = r["inputs"]["real"], r["inputs"]["labels"]
    axes[0].scatter(real[:, 0], real[:, 1], c=labels, s=4, cmap=cmap)
    axes[0].set_title(f"real data (train acc {r['train_accuracy']:.1f}%)")
    axes[0].legend(handles=classes, title="colour: label", fontsize=8, loc="center")
    noise = r["inputs"]["noise"]
    axes[1].scatter(noise[:, 0], noise[:, 1], s=4, c="grey")
    axes[1].set_title("Gaussian noise input")
    for ax in axes[:2]:
        ax.set_xlabel("input x1")
        ax.set_ylabel("input x2")
    ref = r["embeddings"][SETS[0]]
    # One scale for the three embeddings: the distances in the titles compare by eye.
    every = np.concatenate([r["embeddings"][name] for name in SETS])
    lo, hi = every.min(0), every.max(0)
    pad = 0.05 * (hi - lo)
    for ax, name in zip(axes[2:], SETS, strict=True):
        e = r["embeddings"][name]
        ax.scatter(e[:, 0], e[:, 1], s=4, c=r["predictions"][name], cmap=cmap)
        if name != SETS[0]:  # drawn over the points, so that it shows where they miss it
            ax.scatter(ref[:, 0], ref[:, 1], s=2, c="black", alpha=0.25, zorder=3)
        dist = r["summary"][name]["mean_distance_to_real"]
        ax.set_title(f"embedding: {name}\nmean distance to real {dist:.3f}")
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xlabel("penultimate unit 1")
        ax.set_ylabel("penultimate unit 2")
    reference = Line2D([], [], ls="", marker="o", color="black", alpha=0.4,
                       label="real data, running BN")
    axes[3].legend(handles=[*classes, reference], title="colour: prediction", fontsize=8,
                   loc="lower right")
    for ax in axes[:2]:
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle("Toy problem (appendix A.1): a BN network's 2-D embedding of real data and of "
                 "Gaussian noise, with its BN layers on running or on the noise batch's own "
                 "statistics")
    save_png(fig, path, dpi=110)
