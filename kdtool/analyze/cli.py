"""``kdtool analyze ...``: the paper's analyses, each writing a PNG and a CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import Force, Json, Seed

analyze_app = typer.Typer(
    help="The paper's analyses as commands; each writes a PNG and a CSV.",
    no_args_is_help=True,
)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("toy")
def toy_cmd(
    out: Annotated[Path, typer.Option(
        "--out", help="Output stem: writes STEM.png and STEM.csv.")] = Path("toy"),
    samples: Annotated[int, typer.Option("--samples", help="Points of make_circles.")] = 1000,
    steps: Annotated[int, typer.Option("--steps", help="Full-batch Adam steps.")] = 600,
    noise_scale: Annotated[float, typer.Option(
        "--noise-scale", help="Std of the Gaussian noise inputs.")] = 1.0,
    force: Force = False,
    seed: Seed = 0,
    as_json: Json = False,
) -> None:
    """The appendix's toy problem (A.1, Fig. 1): noise embeddings on running vs current BN.

    Trains an MLP with two BatchNorm layers and a 2-D penultimate layer on concentric
    circles, then plots the real data, the Gaussian noise, and the 2-D embeddings of the
    real data (running statistics) and of the noise on running and on current statistics,
    with each set's mean distance to the real embedding.

    Example: [bold]kdtool analyze toy --out figures/toy[/bold]
    """
    from kdtool import console
    from kdtool.analyze.toy import ToyConfig, toy

    result = toy(out, ToyConfig(samples=samples, steps=steps, noise_scale=noise_scale,
                                seed=seed), force=force)

    def render(r):
        rows = [[name, f"{s['mean_distance_to_real']:.3f}",
                 " / ".join(str(v) for v in s["predicted_class_share"])]
                for name, s in r["summary"].items()]
        console.out.print(console.table(
            f"toy problem (train accuracy {r['train_accuracy']:.1f}%)",
            ["embedding", "mean distance to real", "predicted class 0 / 1"], rows))
        console.out.print(f"wrote {r['png']} and {r['csv']}")

    console.emit(result, as_json, render)
