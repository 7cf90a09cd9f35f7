"""``kdtool demo``: the whole pipeline on embedded data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import Device, Force, Json, Seed, Threads


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the files the demo writes.")
                   ] = Path("kdtool-demo"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="A smaller run (about a minute on 2 CPU cores): same stages, fewer "
        "noise batches, lower accuracies.")] = False,
    teacher: Annotated[str | None, typer.Option(
        "--teacher", help="The teacher's architecture (kdtool models), trained on digits "
        "first. Default: cnn3 (resnet8 with --quick).", show_default=False)] = None,
    force: Force = False,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Run the whole pipeline on scikit-learn's digits: no download, a few minutes on a CPU.

    Trains a teacher, distils students from noise alone (Gaussian with the teacher's BN on
    running and on current statistics, and dead leaves), calibrates and folds the best one,
    exports ONNX and INT8 ONNX, and benchmarks PyTorch against ONNX Runtime.

    Example: [bold]kdtool demo --out kdtool-demo[/bold]
    """
    from kdtool import console
    from kdtool.demo import Demo
    from kdtool.device import cpu_threads
    from kdtool.interrupts import Stopped

    try:
        with cpu_threads(threads):
            result = Demo(out, quick=quick, seed=seed, force=force, device=device,
                          teacher=teacher, threads=threads).run()
    except KeyboardInterrupt as e:  # the folder now holds a part of the demo's files
        raise Stopped(e, f"'{out}' holds what the demo finished; to run it again, pass "
                         "--force (it starts over)") from None
    console.emit(result, as_json, render_summary)


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def render_summary(r: dict) -> None:
    from kdtool import console
    from kdtool.deploy.bench_report import runtime_note

    t = r["teacher"]
    rows = [[f"teacher ({t['arch']})", f"{_pct(t['top1'])} on digits:test"]]
    for s in r["students"]:
        best = " [best]" if s["file"] == r["best_student"] else ""
        rows.append([f"student: {s['label']}{best}",
                     f"{_pct(s['top1_current'])} (own running BN {_pct(s['top1_running'])})"])
    curves = r["curves"]
    rows.append(["students' learning curves",
                 ", ".join(Path(f).name for f in (curves["png"], curves["csv"]) if f)
                 + (f" ({curves['note']})" if "note" in curves else "")])
    c = r["calibrated"]
    rows.append(["best student calibrated (32 x 16 real images) + folded",
                 f"{_pct(c['top1'])} on running BN (was {_pct(c['top1_noise_running'])}); "
                 f"fold max|diff| {c['max_abs_diff']:.1e}"])
    for precision in ("fp32", "int8"):
        e = r["export"][precision]["result"]
        parity, val = e["parity"].get(precision, {}), e.get("val", {})
        rows.append([f"ONNX {precision} ({e['sizes']['onnx_bytes'] / 1024:.0f} KiB)",
                     f"{_pct(val.get(f'onnx_{precision}_top1'))}; agrees with PyTorch "
                     f"{_pct(parity.get('top1_agreement'))}, max|diff| "
                     f"{parity.get('max_abs_diff', float('nan')):.1e}"])
    for row in r["bench"]["rows"]:
        what = f"latency: {Path(row['model']).name} on {row['backend']}, batch {row['batch']}"
        if row["status"] != "ok":
            rows.append([what, f"{row['status']}: {row.get('reason') or ''}"])
            continue
        note = runtime_note(row)  # e.g. other work took the cores: figures not to quote
        rows.append([what, f"p50 {row['latency_ms']['p50']:.3f} ms, "
                           f"{console.rate_text(row['throughput'])} img/s"
                           + (f" ({note})" if note else "")])
    console.out.print(console.table(f"kdtool demo: {r['seconds']:.0f} s", ["stage", "result"],
                                    rows))
    files = sorted(p.name for p in Path(r["out"]).iterdir())
    states = [f for f in files if f.endswith(".state.pt")]
    console.out.print(f"files in {r['out']}: " + ", ".join(f for f in files if f not in states)
                      + (f" (and {len(states)} run states, *.state.pt, for --resume)"
                         if states else ""), markup=False)
    onnx = Path(r["out"]) / "student.onnx"
    if onnx.exists():
        console.out.print(f"next: kdtool predict {onnx} IMAGES... (a digit, light on dark, "
                          f"8x8 or any size), or kdtool serve {onnx}", soft_wrap=True,
                          markup=False)
