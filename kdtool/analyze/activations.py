"""Activation distributions (the paper's appendix A.6, Figs. 5-8).

For a teacher and a labelled or unlabelled dataset: at each named layer, the
distribution of per-channel mean activations (spatial mean per image and channel)
for (1) real images with BN on running statistics, (2) noise with BN on running
statistics, (3) noise with BN on the noise batch's current statistics; with the
Wasserstein-1 distance of (2) and (3) from (1). The paper's point: (3) lies close to
(1), (2) does not.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kdtool.analyze import pyplot, save_png
from kdtool.bn import batch_stats, bn_layers
from kdtool.errors import KdtoolError, check_choice

CONDITIONS = ("real, running BN", "noise, running BN", "noise, current BN")


@dataclass
class ActivationsConfig:
    teacher: str
    data: str
    noise: str = "gaussian"
    layers: list[str] | None = None  # None: the model's top-level blocks
    samples: int = 512
    batch_size: int = 256  # the batch the current statistics come from
    seed: int = 0


def default_layers(model: nn.Module) -> list[str]:
    """Top-level children that hold (or are) BatchNorm layers: stem and stages, by name."""
    return [name for name, child in model.named_children() if bn_layers(child)]


def collect(model: nn.Module, layers: list[str], x: torch.Tensor, batch: int,
            current: bool, inputs: bool = False) -> dict[str, np.ndarray]:
    """Per-channel means of each layer's output (or input) over ``x``, BN on running or
    current statistics (batches of ``batch``)."""
    modules = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name):
        def fn(_m, args, y):
            y = args[0] if inputs else y
            y = y if y.ndim == 2 else y.flatten(2).mean(2)  # (N, C) per-channel means
            out[name].append(y.detach().float().flatten())
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    model.eval()
    try:
        with torch.no_grad(), batch_stats(model) if current else nullcontext():
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v).numpy() for n, v in out.items()}


def run_activations(cfg: ActivationsConfig) -> dict:
    from scipy.stats import wasserstein_distance

    from kdtool.checkpoint import load_checkpoint
    from kdtool.data import load_for_model
    from kdtool.distill.noise import make_noise

    model, meta = load_checkpoint(cfg.teacher)
    if not bn_layers(model):
        raise KdtoolError(f"teacher '{cfg.teacher}' has no BatchNorm layers: running and "
                          "current statistics are the same thing for it")
    modules = dict(model.named_modules())
    layers = cfg.layers or default_layers(model)
    for name in layers:
        check_choice(name, [n for n in modules if n], f"layer of {meta.arch}")
    if cfg.samples < 2 or cfg.batch_size < 2:
        raise KdtoolError("--samples and --batch-size must be >= 2")
    data = load_for_model(cfg.data, meta, labels=False)  # pixels only
    gen = torch.Generator().manual_seed(cfg.seed)
    n = min(cfg.samples, len(data))
    idx = torch.randperm(len(data), generator=gen)[:n]
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    real = (data.x[idx].float() / 255 - mean) / std
    noise = make_noise(cfg.noise, meta.in_chans, tuple(meta.input_size), meta.mean, meta.std,
                       "cpu").sample(n, gen)
    acts = {CONDITIONS[0]: collect(model, layers, real, cfg.batch_size, current=False),
            CONDITIONS[1]: collect(model, layers, noise, cfg.batch_size, current=False),
            CONDITIONS[2]: collect(model, layers, noise, cfg.batch_size, current=True)}
    rows = []
    for layer in layers:
        ref = acts[CONDITIONS[0]][layer]
        for cond in CONDITIONS:
            v = acts[cond][layer]
            rows.append({"layer": layer, "condition": cond,
                         "wasserstein_to_real": float(wasserstein_distance(v, ref)),
                         "mean": float(v.mean()), "std": float(v.std()),
                         "p05": float(np.percentile(v, 5)), "p50": float(np.median(v)),
                         "p95": float(np.percentile(v, 95))})
    return {"teacher": cfg.teacher, "arch": meta.arch, "data": cfg.data, "noise": cfg.noise,
            "images": n, "layers": layers, "rows": rows, "values": acts}


def write_png(path: Path, r: dict) -> None:
    plt = pyplot()

    layers = r["layers"]
    cols = min(4, len(layers))
    rows_n = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    dist = {(x["layer"], x["condition"]): x["wasserstein_to_real"] for x in r["rows"]}
    for ax, layer in zip(axes.flat, layers, strict=False):
        values = [r["values"][c][layer] for c in CONDITIONS]
        lo = min(np.percentile(v, 0.5) for v in values)
        hi = max(np.percentile(v, 99.5) for v in values)
        bins = np.linspace(lo, hi, 60) if hi > lo else 10
        for cond, v, style in zip(CONDITIONS, values, ("-", "--", ":"), strict=False):
            ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.4,
                    linestyle=style, label=cond)
        # The distances in the title, one legend for the figure: a legend in each panel
        # covered the peaks it labelled
        w1 = ", ".join(f"{cond.split(', ')[-1]} {dist[(layer, cond)]:.3f}"
                       for cond in CONDITIONS[1:])
        ax.set_title(f"{layer}\nW1 to real: {w1}", fontsize=10)
        ax.set_xlabel("per-channel mean activation")
        ax.set_ylabel("density")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(CONDITIONS), fontsize=9,
               frameon=False)
    fig.suptitle(f"{r['arch']}: activations on {r['images']:,} images of {r['data']} and as "
                 f"many of {r['noise']} noise (W1: Wasserstein distance to real)")
    save_png(fig, path, rect=(0, 0.07, 1, 1))
