"""A noise student's penultimate features on real data (the paper's appendix A.3, Fig. 2).

Three states of the same student on the same real images: BN on its own running
statistics (statistics of noise), BN on current batch statistics (how the paper evaluates
it), and BN recalibrated on a few real batches (``kdtool calibrate``). The features are
the input of the final linear layer (the pooled features). With noise statistics they
are shifted away from the current-statistics ones; calibration brings them back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from kdtool.analyze import pyplot, save_png
from kdtool.analyze.activations import collect
from kdtool.bn import bn_layers
from kdtool.errors import KdtoolError

STATES = ("noise running BN", "current BN", "calibrated BN")


@dataclass
class StudentConfig:
    student: str
    data: str  # real images whose features are plotted (and accuracy, when labelled)
    calib_data: str | None = None  # default: data
    batches: int = 32
    batch_size: int = 16
    samples: int = 512
    seed: int = 0


def head_name(model: nn.Module) -> str:
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise KdtoolError("the student has no linear classifier layer to take features from")
    return linear[-1]


def run_student(cfg: StudentConfig) -> dict:
    from scipy.stats import wasserstein_distance

    from kdtool.calibrate.recompute import recompute_bn_stats
    from kdtool.checkpoint import load_checkpoint
    from kdtool.data import load_for_model

    if cfg.samples < 2:  # current statistics need a batch of two or more
        raise KdtoolError(f"--samples must be >= 2, got {cfg.samples}")
    model, meta = load_checkpoint(cfg.student)
    if not bn_layers(model):
        raise KdtoolError(f"'{cfg.student}' has no BatchNorm layers (already folded?)",
                          "pass the distilled student, before kdtool calibrate")
    data = load_for_model(cfg.data, meta)
    calib = load_for_model(cfg.calib_data, meta, labels=False) if cfg.calib_data else data
    gen = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(data), generator=gen)[:min(cfg.samples, len(data))]
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    x = (data.x[idx].float() / 255 - mean) / std
    head = head_name(model)
    calibrated = copy.deepcopy(model)
    recompute_bn_stats(calibrated, calib, meta.mean, meta.std, cfg.batches, cfg.batch_size,
                       cfg.seed, progress=False)
    batch = 256
    feats = {STATES[0]: collect(model, [head], x, batch, current=False, inputs=True)[head],
             STATES[1]: collect(model, [head], x, batch, current=True, inputs=True)[head],
             STATES[2]: collect(calibrated, [head], x, batch, current=False, inputs=True)[head]}
    labels = data.y[idx].numpy() if data.labeled else None
    rows = []
    ref = feats[STATES[1]]
    for state in STATES:
        f = feats[state]
        row = {"state": state, "wasserstein_to_current": float(wasserstein_distance(f, ref)),
               "mean": float(f.mean()), "std": float(f.std())}
        if labels is not None:
            net = calibrated if state == STATES[2] else model
            row["top1"] = _accuracy(net, x, labels, batch, current=state == STATES[1])
        rows.append(row)
    return {"student": cfg.student, "arch": meta.arch, "data": cfg.data, "images": len(idx),
            "features": f"input of '{head}'", "rows": rows,
            "values": {STATES[i]: feats[s] for i, s in enumerate(STATES)}}


@torch.no_grad()
def _accuracy(model, x, labels, batch, current) -> float:
    from contextlib import nullcontext

    from kdtool.bn import batch_stats

    model.eval()
    preds = []
    with batch_stats(model) if current else nullcontext():
        for i in range(0, len(x), batch):
            preds.append(model(x[i:i + batch]).argmax(1))
    return 100.0 * float((torch.cat(preds).numpy() == labels).mean())


def write_png(path, r: dict) -> None:
    plt = pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    values = [r["values"][s] for s in STATES]
    lo = min(np.percentile(v, 0.5) for v in values)
    hi = max(np.percentile(v, 99.5) for v in values)
    bins = np.linspace(lo, hi, 60) if hi > lo else 10
    for row, v in zip(r["rows"], values, strict=True):
        acc = f", top-1 {row['top1']:.1f}%" if "top1" in row else ""
        ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.4,
                label=f"{row['state']} (W1 {row['wasserstein_to_current']:.3f}{acc})")
    ax.set_xlabel(f"feature value ({r['features']})")
    ax.set_ylabel("density")
    ax.set_title(f"{r['arch']} student on {r['images']:,} images of {r['data']}\n"
                 "W1: Wasserstein distance to current BN")
    ax.legend(fontsize=7)
    save_png(fig, path)
