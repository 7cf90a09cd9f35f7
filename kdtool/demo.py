"""``kdtool demo``: the whole pipeline on scikit-learn's digits, with no download.

1. train a small teacher on ``digits``;
2. distil students from Gaussian noise with the teacher on running statistics (classic KD,
   the failure baseline) and on current statistics (the method), and one from dead leaves,
   and draw their learning curves (``kdtool analyze curves``; the PNG needs matplotlib);
3. calibrate the best student's BatchNorm statistics on 32 x 16 real images and fold BN;
4. export it to ONNX (FP32) and INT8 QDQ ONNX, each checked against PyTorch;
5. benchmark PyTorch against ONNX Runtime on the CPU.

Every stage is the code its own command runs (``kdtool train``, ``distill``, ...), called
in-process; the files it writes are ordinary kdtool outputs to continue from.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kdtool import console
from kdtool.errors import KdtoolError

TRAIN, TEST = "digits", "digits:test"


@dataclass(frozen=True)
class DemoScale:
    teacher: str
    teacher_epochs: int
    student: str
    epochs: int  # distillation epochs of iters x batch noise images
    iters: int
    batch: int
    pool: int  # dead-leaves pool rendered per epoch
    lr: float
    calib_batches: int
    bench_batches: tuple[int, ...]
    bench_min_time: float


# Sized by measurement on 2 CPU cores (docs/BENCHMARKS.md, "kdtool demo").
SCALES = {
    "full": DemoScale("cnn3", 15, "tiny_cnn", 12, 100, 256, 4096, 0.01, 32, (1, 64), 0.5),
    "quick": DemoScale("resnet8", 10, "tiny_cnn", 6, 50, 256, 1024, 0.01, 32, (1,), 0.1),
}
STUDENTS = (  # (file stem, label, noise, teacher BN, --balance)
    ("student_gaussian_running", "Gaussian noise, teacher BN running (classic KD)", "gaussian",
     "running", "off"),
    ("student_gaussian_current", "Gaussian noise, teacher BN current (the method)", "gaussian",
     "current", "weight"),
    ("student_dead_leaves_current", "dead leaves, teacher BN current", "dead_leaves", "current",
     "weight"),
)


def check_out_dir(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise KdtoolError(f"--out '{out}' is a file", "pass a folder for the demo's outputs")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KdtoolError(f"--out '{out}' is not empty",
                          "pass --force to overwrite the demo files in it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_teacher(arch: str) -> None:
    from kdtool.data import load_data
    from kdtool.models import check_input_size, create_model

    data = load_data(TRAIN)
    model = create_model(arch, num_classes=data.num_classes, in_chans=data.channels)
    size = "x".join(map(str, (data.channels, *data.image_size)))
    check_input_size(model, arch, data.channels, data.image_size,
                     f"the demo's digits are {size} images: pick a --teacher that takes them, "
                     "e.g. cnn3, resnet8 or resnet20 (kdtool models)")


class Demo:
    def __init__(self, out: str | Path, quick: bool = False, seed: int = 0, force: bool = False,
                 device: str = "auto", teacher: str | None = None, threads: int | None = None):
        scale = SCALES["quick" if quick else "full"]
        self.scale = replace(scale, teacher=teacher) if teacher else scale
        if teacher:  # a name or an architecture the digits do not fit fails before any file
            _check_teacher(teacher)
        self.out = check_out_dir(Path(out), force)
        self.seed, self.device, self.threads = seed, device, threads
        self.steps: list[dict] = []

    def _step(self, n: int, title: str) -> float:
        console.info(f": {title}", heading=f"demo step {n}/5")
        return time.perf_counter()

    def run(self) -> dict:
        t0 = time.perf_counter()
        teacher = self.train_teacher()
        students = self.distil(teacher)
        curves = self.curves(students)
        best = max(students, key=lambda s: s["top1_current"])
        cal = self.calibrate(best)
        onnx = self.export(cal["file"])
        bench = self.bench(cal["file"], onnx)
        return {"out": str(self.out), "scale": asdict(self.scale), "seed": self.seed,
                "teacher": teacher, "students": students, "curves": curves,
                "best_student": best["file"],
                "calibrated": cal, "export": onnx, "bench": bench,
                "seconds": time.perf_counter() - t0}

    def train_teacher(self) -> dict:
        from kdtool.train import TrainConfig, Trainer

        s = self.scale
        t = self._step(1, f"train a {s.teacher} teacher on {TRAIN}")
        path = self.out / "teacher.safetensors"
        r = Trainer(TrainConfig(arch=s.teacher, data=TRAIN, val=TEST, epochs=s.teacher_epochs,
                                batch_size=64, seed=self.seed, device=self.device),
                    path, force=True).run()
        return {"file": str(path), "arch": s.teacher, "top1": r["val_top1"],
                "seconds": time.perf_counter() - t}

    def distil(self, teacher: dict) -> list[dict]:
        from kdtool.distill.loop import DistillConfig, DistillRun

        s = self.scale
        t = self._step(2, f"distil {len(STUDENTS)} {s.student} students from noise "
                          f"({s.epochs} x {s.iters} batches of {s.batch})")
        rows = []
        for stem, label, noise, bn, balance in STUDENTS:
            t1 = time.perf_counter()
            path = self.out / f"{stem}.safetensors"
            r = DistillRun(DistillConfig(
                teacher=teacher["file"], student=s.student, noise=noise, teacher_bn=bn,
                balance=balance,
                noise_pool=s.pool if noise == "dead_leaves" else 0, epochs=s.epochs,
                iters_per_epoch=s.iters, batch_size=s.batch, schedule="onecycle", lr=s.lr,
                val=TEST, val_every=max(1, s.epochs // 6), seed=self.seed,
                device=self.device),
                path, force=True).run()
            rows.append({"file": str(path), "label": label, "noise": noise, "teacher_bn": bn,
                         "top1_current": r["val_top1_current"],
                         "top1_running": r["val_top1_running"],
                         "seconds": time.perf_counter() - t1})
        console.info(f"distilled in {time.perf_counter() - t:.0f} s")
        return rows

    def curves(self, students: list[dict]) -> dict:
        """The students' learning curves: a CSV always, the PNG when matplotlib is installed."""
        from kdtool.analyze import write_csv
        from kdtool.analyze.curves import load_runs, long_rows, write_png

        runs = load_runs([Path(st["file"]) for st in students])
        out = {"csv": str(self.out / "students.csv"), "png": None}
        write_csv(Path(out["csv"]), long_rows(runs))
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            out["note"] = "pip install 'kdtool[plot]' to draw students.png as well"
            return out
        out["png"] = str(self.out / "students.png")
        write_png(Path(out["png"]), runs, "demo students: learning curves on digits")
        return out

    def calibrate(self, student: dict) -> dict:
        from kdtool.calibrate.pipeline import CalibrateConfig, calibrate

        s = self.scale
        t = self._step(3, f"calibrate '{Path(student['file']).name}' on {s.calib_batches} x 16 "
                          f"real images and fold BatchNorm")
        path = self.out / "student.cal.safetensors"
        r = calibrate(CalibrateConfig(checkpoint=student["file"], data=TRAIN, out=str(path),
                                      batches=s.calib_batches, batch_size=16, val=TEST,
                                      seed=self.seed, device=self.device, force=True))
        acc = r.get("accuracy", {})
        return {"file": str(path), "from": student["file"],
                "top1": acc.get("calibrated"), "top1_noise_running": acc.get("input_running"),
                "top1_current": acc.get("input_current"),
                "max_abs_diff": (r.get("fold") or {}).get("max_abs_diff"),
                "seconds": time.perf_counter() - t}

    def export(self, checkpoint: str) -> dict:
        from kdtool.export.pipeline import ExportConfig, run_export

        t = self._step(4, "export ONNX (FP32) and INT8 ONNX, each checked against PyTorch")
        rows = {}
        for precision, name in (("fp32", "student.onnx"), ("int8", "student.int8.onnx")):
            r = run_export(ExportConfig(
                checkpoint=checkpoint, onnx=str(self.out / name), precision=precision,
                calib_data=TRAIN if precision == "int8" else None, val=TEST, force=True,
                seed=self.seed, threads=self.threads))
            rows[precision] = {"file": str(self.out / name), "result": r}
        rows["seconds"] = time.perf_counter() - t
        return rows

    def bench(self, checkpoint: str, onnx: dict) -> dict:
        from kdtool.deploy.bench import Bench, BenchConfig

        s = self.scale
        t = self._step(5, "benchmark PyTorch against ONNX Runtime on the CPU")
        r = Bench(BenchConfig(models=[checkpoint, onnx["fp32"]["file"], onnx["int8"]["file"]],
                              backends=["torch-cpu", "ort-cpu"], batches=s.bench_batches,
                              min_time=s.bench_min_time, warmup=3, data=TEST,
                              seed=self.seed, threads=self.threads)).run()
        r["seconds"] = time.perf_counter() - t
        return r
