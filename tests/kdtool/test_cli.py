"""The CLI's contract: --help everywhere, --json, one-line errors with exit 1."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdtool.cli import app
from kdtool.cli.app import reflow

COMMANDS = ["models", "info", "convert", "train", "eval"]


def test_every_command_has_help_with_an_example(cli):
    registered = {c.name for c in app.registered_commands}
    assert set(COMMANDS) <= registered
    groups = {g.name for g in app.registered_groups}  # kdtool analyze
    for name in registered | groups:
        r = cli(name, "--help")
        assert r.code == 0, r.err
        assert "Example" in r.out, f"'kdtool {name} --help' shows no example"
        assert "<bool>" not in r.out, f"'kdtool {name} --help' shows a value for a flag"
        assert "<list[" not in r.out, f"'kdtool {name} --help' shows a Python type"
    r = cli("analyze", "curves", "--help")
    assert re.search(r"checkpoints\.\.\.\s+<path>", r.out) and "<list[" not in r.out


def test_help_paragraphs_are_reflowed_to_the_terminal(cli, monkeypatch):
    doc = "Summary line.\n\nA wrapped\n    paragraph.\n\n- item one\n  continued\n- item two"
    want = "Summary line.\n\nA wrapped paragraph.\n\n- item one continued\n- item two"
    assert reflow(doc) == want
    # A paragraph wrapped at 88 columns in the source comes out whole at 200 columns.
    monkeypatch.setenv("COLUMNS", "200")
    r = cli("distill", "--help")
    assert "statistics of each noise batch (--teacher-bn current), which is" in r.out


def test_version_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "kdtool", "--version"], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and r.stdout.startswith("kdtool ")


def test_models_lists_the_zoo_with_counts(cli):
    r = cli("models", "--json")
    assert r.code == 0
    rows = {m["name"]: m for m in r.json()["models"]}
    assert rows["resnet18"]["params"] == 11_173_962
    assert rows["resnet34"]["params"] == 21_282_122
    assert rows["resnet18"]["input_size"] == [32, 32]
    assert {"resnet8", "resnet20", "mobilenetv2", "wrn16_8", "wrn28_10", "densenet121",
            "densenet169", "tiny_cnn"} <= set(rows)


def test_models_lists_every_torchvision_classifier(cli):
    from kdtool.models.torchvision_models import list_names

    rows = {m["name"]: m for m in cli("models", "--torchvision", "--json").json()["models"]}
    assert {"tv:" + n for n in list_names()} <= set(rows)
    # RegNet builders read tensor values, so they cannot be counted on the meta device.
    assert rows["tv:regnet_y_400mf"]["params"] == 4_344_144
    assert rows["tv:resnet18"]["params"] == 11_689_512


def _one_line_error(r, *fragments):
    assert r.code == 1, (r.code, r.out, r.err)
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["info", "missing.safetensors"], ["missing.safetensors", "does not exist"]),
        (["eval", "missing.safetensors", "--data", "digits"], ["does not exist"]),
        (["train", "--data", "digits", "--arch", "resnet19"],
         ["resnet19", "did you mean 'resnet18'"]),
        (["train", "--data", "digits", "--optimizer", "sgdd"], ["sgdd", "did you mean 'sgd'"]),
        (["train", "--data", "digits", "--epochs", "abc"], ["--epochs"]),
        (["train", "--data", "digits", "--epochs", "0"], ["--epochs must be >= 1"]),
        (["train", "--data", "digts", "--epochs", "1"], ["digts", "did you mean 'digits'"]),
        (["train", "--data", "digits", "--mean", "a,b"], ["--mean", "numbers"]),
        (["train", "--data", "digits", "--optimiser", "sgd"], ["--optimiser", "--optimizer"]),
        (["trian"], ["trian", "train"]),
        # Options from other tools get kdtool's spelling, among the command's own options.
        (["export", "s.safetensors", "--format", "onnx"],
         ["--format; kdtool spells it --precision fp32|fp16|int8 or --trt"]),
        (["distill", "--model", "resnet8"], ["--model; kdtool spells it --student or --teacher"]),
        (["train", "--model", "resnet8"], ["--model; kdtool spells it --arch ("]),
        (["eval", "m.safetensors", "--val", "digits"], ["--val; kdtool spells it --data ("]),
        (["export", "m.safetensors", "--data", "digits"],
         ["--data; kdtool spells it --val or --calib-data ("]),
        # distill's --arch may describe the student or a plain state_dict teacher: both.
        (["distill", "--teacher", "t.pt", "--arch", "tv:resnet18"],
         ["--arch; kdtool spells it --student for the student's architecture; a plain "
          "PyTorch state_dict teacher becomes a kdtool checkpoint first: 'kdtool convert T.pt "
          "--arch ARCH --out T.safetensors', then --teacher T.safetensors ("]),
        (["analyze", "sweep", "--arch", "resnet8"], ["--arch; kdtool spells it --student for"]),
        (["export", "m.safetensors", "--half"], ["--half; kdtool spells it --precision fp16"]),
        (["train", "--data", "digits", "-b", "64"], ["-b; kdtool spells it --batch-size"]),
        (["bench", "m.onnx", "-b", "1"], ["-b; kdtool spells it --batch ("]),
        (["calibrate", "s.safetensors", "-o", "c.safetensors"], ["-o; kdtool spells it --out ("]),
        # Cutout is part of the augmentation, which is off for 8x8 digits.
        (["train", "--data", "digits", "--arch", "tiny_cnn", "--cutout", "4"],
         ["--cutout 4 erases squares during augmentation", "off for 8x8 images",
          "add --augment"]),
        (["train", "--data", "digits", "--arch", "tiny_cnn", "--cutout", "4", "--no-augment"],
         ["and --no-augment"]),
        (["distill", "--teacher", "{teacher}", "--val-every", "5"],
         ["--val-every 5 paces validation on --val, and there is none"]),
        (["analyze", "sweep", "--teacher", "{teacher}", "--val", "digits:test", "--keep",
          "step"], ["unknown --keep 'step'", "did you mean 'steps'"]),
        (["analyze", "student", "{teacher}", "--data", "digits:test", "--samples", "0"],
         ["--samples must be >= 2, got 0"]),
        # A kdtool checkpoint records what the plain-state_dict flags would say.
        (["eval", "{teacher}", "--data", "digits", "--num-classes", "100"],
         ["--num-classes describes a plain state_dict", "records its classes"]),
        (["eval", "{teacher}", "--data", "digits", "--in-chans", "3"],
         ["--in-chans describes a plain state_dict", "drop --in-chans"]),
        # What users call a GPU is CUDA here, not the nearest spelling ('cpu').
        (["serve", "m.onnx", "--provider", "gpu"], ["did you mean 'cuda'"]),
        (["bench", "m.onnx", "--backends", "ort-gpu"], ["did you mean 'ort-cuda'"]),
        (["bench", "m.onnx", "--backends", "ort-tensorrt"], ["did you mean 'ort-trt'"]),
        (["predict", "m.onnx", "a.png", "--device", "cuda"],
         ["--device; kdtool spells it --backend"]),
        (["predict", "m.onnx", "a.png", "-k", "3"], ["-k; kdtool spells it --top"]),
        (["predict", "m.onnx", "a.png", "-o", "p.csv"], ["-o; kdtool spells it --csv"]),
        (["bench", "m.onnx", "--backend", "ort-cpu"], ["--backend; kdtool spells it --backends"]),
        # bench has no --precision: the look-alike suggestion stays.
        (["bench", "--format", "onnx"], ["--format", "--formats"]),
        (["eval", "m.safetensors", "--format", "json"], ["--format; kdtool spells it --json"]),
        (["info", "m.safetensors", "--format", "json"], ["--format; kdtool spells it --json"]),
        # only values the command takes: train's --precision has bf16, not fp16 or int8
        (["train", "--data", "digits", "--half"], ["--half; kdtool spells it --precision bf16 ("]),
        (["distill", "--teacher", "t.safetensors", "--fp16"],
         ["--fp16; kdtool spells it --precision bf16 ("]),
        # a setting kdtool knows from other tools, which this command lacks: no look-alike
        (["distill", "--teacher", "t.safetensors", "--int8"],
         ["No such option: --int8; 'kdtool distill' has no setting of that kind ("]),
        (["calibrate", "s.safetensors", "--half"],
         ["--half; 'kdtool calibrate' has no setting of that kind ("]),
        (["serve", "m.onnx", "-b", "8"], ["-b; kdtool spells it --max-batch ("]),
        (["serve", "m.onnx", "--batch-size", "8"], ["--batch-size; kdtool spells it --max-batch"]),
        # click's look-alikes, without --help
        (["eval", "m.safetensors", "--dat", "x"],
         ["No such option: --dat; did you mean --data or "]),
        (["train", "--data", "digits", "--format", "onnx"],
         ["--format; kdtool spells it --json ("]),
        # where the model file is the first argument, an option for it says so
        (["info", "m.safetensors", "--model", "x"],
         ["No such option: --model; the model is the first argument: kdtool info CHECKPOINT "
          "... (see"]),
        (["serve", "m.onnx", "--model", "x"], ["the model is the first argument: kdtool serve "
                                                "MODEL ..."]),
        (["eval", "m.safetensors", "-m", "x"], ["kdtool eval CHECKPOINT ..."]),
        # an option of other commands says which, rather than click's look-alikes here
        (["eval", "m.pth", "--resize", "stretch"],
         ["No such option: --resize; it is an option of 'kdtool convert' and 'kdtool train' "
          "(see 'kdtool eval --help')"]),
        (["models", "--seed", "1"], ["--seed; it is an option of 'kdtool analyze activations', "
                                     "'kdtool analyze student', 'kdtool analyze sweep' and "]),
    ],
)
def test_user_errors_are_one_line_exit_1(cli, tmp_path, monkeypatch, args, fragments,
                                        digits_teacher):
    monkeypatch.chdir(tmp_path)
    _one_line_error(cli(*[a.format(teacher=digits_teacher) for a in args]), *fragments)


def test_eval_bad_bn_mode_suggests(cli, digits_teacher):
    _one_line_error(cli("eval", digits_teacher, "--data", "digits:test", "--bn", "curent"),
                    "did you mean 'current'")


def test_eval_plain_state_dict_needs_arch(cli, tmp_path):
    import torch

    from kdtool.models import create_model

    torch.save(create_model("resnet8").state_dict(), tmp_path / "r8.pt")
    _one_line_error(cli("eval", tmp_path / "r8.pt", "--data", "digits"), "--arch")


def test_internal_bugs_keep_their_traceback(monkeypatch):
    """A bug is not a user error: it escapes main() as itself, with its traceback."""
    import kdtool.checkpoint
    from kdtool.cli import main

    def bug(path):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(kdtool.checkpoint, "read_meta", bug)
    with pytest.raises(ZeroDivisionError):
        main(["info", "x.safetensors"])


def test_tables_right_align_numbers_and_left_align_text():
    from kdtool.console import table

    t = table("t", ["name", "params", "top-1", "description", "flag"],
               [["a", 0.09, "76.3%", "CIFAR ResNet-8, 78K params", True],
                ["b", "12.49", "-", "tiny", False]])
    assert [c.justify for c in t.columns] == ["left", "right", "right", "left", "left"]


def _commands(typer_app, prefix: str = "") -> dict:
    out = {prefix + c.name: c.callback for c in typer_app.registered_commands}
    for group in typer_app.registered_groups:
        out.update(_commands(group.typer_instance, prefix + group.name + " "))
    return out


def test_every_config_field_is_reachable_from_its_command():
    """A config field without a CLI option is a feature users cannot reach (it happened:
    DistillConfig.ema had no --ema)."""
    import dataclasses
    import inspect

    from kdtool.analyze.activations import ActivationsConfig
    from kdtool.analyze.student import StudentConfig
    from kdtool.analyze.toy import ToyConfig
    from kdtool.calibrate.pipeline import CalibrateConfig
    from kdtool.deploy.bench import BenchConfig
    from kdtool.deploy.predict import PredictConfig
    from kdtool.deploy.server.app import ServerConfig
    from kdtool.distill.loop import DistillConfig
    from kdtool.export.pipeline import ExportConfig
    from kdtool.train import TrainConfig

    # Fields the CLI fills under another name, or that only library callers set.
    other_names = {"compile": "compile_", "noise_options": "shapes", "inputs": "images"}
    bench_names = {"batches": "batch"}  # bench's --batch 1,8,64
    library_only = {"log_every", "threads", "default_top_k"}
    configs = {"train": TrainConfig, "distill": DistillConfig, "calibrate": CalibrateConfig,
               "export": ExportConfig, "bench": BenchConfig, "serve": ServerConfig,
               "predict": PredictConfig, "analyze toy": ToyConfig,
               "analyze activations": ActivationsConfig, "analyze student": StudentConfig}
    commands = _commands(app)
    for name, config in configs.items():
        params = set(inspect.signature(commands[name]).parameters)
        names = {**other_names, **(bench_names if name == "bench" else {})}
        missing = [f.name for f in dataclasses.fields(config)
                   if names.get(f.name, f.name) not in params
                   and f.name not in library_only]
        assert not missing, f"kdtool {name} has no option for {missing}"


def _unknown_options(text: str) -> list[tuple[str, str]]:
    """(command, option) for each --option of a `kdtool ...` command in ``text`` (code
    blocks and inline code) that the command does not have."""
    import re

    import typer

    root = typer.main.get_command(app)
    text = text.replace("\\\n", " ")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    snippets = [line for b in blocks for line in b.splitlines()]
    snippets += re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    bad = []
    for snippet in snippets:
        one_line = snippet.replace("\n", " ")
        for m in re.finditer(r"(?:^|[\s;&(])kdtool ((?:[a-z]+ ?){1,2})(.*)", one_line):
            command, path = root, []
            for word in m.group(1).split():
                if word in getattr(command, "commands", {}):  # a group: descend
                    command = command.commands[word]
                    path.append(word)
            if not path:
                continue
            known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            # Stop at a shell separator: what follows belongs to another program.
            args = re.split(r"\s(?:&&|\||;)\s", m.group(2))[0]
            bad += [(" ".join(path), o) for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", args)
                    if o not in known and o != "--help"]
    return bad


def test_documented_commands_use_options_that_exist():
    root = Path(__file__).resolve().parents[2]
    assert _unknown_options("run `kdtool distill --teacher t --emaa 0.9`") == [("distill",
                                                                                 "--emaa")]
    assert _unknown_options("```bash\nkdtool analyze toy \\\n  --outt x\n```") == [
        ("analyze toy", "--outt")]
    for doc in ("README.md", "docs/BENCHMARKS.md", "docs/RESULTS.md"):
        assert _unknown_options((root / doc).read_text()) == [], doc


def test_foreign_option_hints_name_real_options():
    """Every kdtool spelling in the hint table is an option of some command: no hint rots."""
    import typer

    from kdtool.cli.hints import FOREIGN_OPTIONS, TWO_MEANINGS

    def commands(c):
        subs = getattr(c, "commands", None)
        return [x for s in subs.values() for x in commands(s)] if subs else [c]

    real = {o for c in commands(typer.main.get_command(app)) for p in c.params
            for o in (*p.opts, *p.secondary_opts)}
    for foreign, spellings in FOREIGN_OPTIONS.items():
        for s in spellings:
            assert s.split()[0] in real, (foreign, s)
    for foreign, meanings in TWO_MEANINGS.items():
        for needs, _ in meanings:
            assert any(set(needs) <= {o for p in c.params for o in (*p.opts, *p.secondary_opts)}
                       for c in commands(typer.main.get_command(app))), (foreign, needs)


def _plain_copy(checkpoint: Path, out: Path):
    import torch

    from kdtool.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    torch.save(model.state_dict(), out)
    return meta


def test_a_plain_state_dict_takes_its_input_size_and_scores_as_its_source(cli, digits_teacher,
                                                                           tmp_path):
    """A digits model scored at its architecture's default 32x32 is scored at chance: the
    input size of a plain state_dict is an option, and convert prints what it recorded."""
    meta = _plain_copy(digits_teacher, tmp_path / "t.pt")
    plain = ["--arch", meta.arch, "--in-chans", "1", "--mean", str(meta.mean[0]), "--std",
             str(meta.std[0])]
    want = cli("eval", digits_teacher, "--data", "digits:test", "--json").json()["top1"]
    r = cli("eval", tmp_path / "t.pt", *plain, "--image-size", "8", "--data", "digits:test",
            "--json")
    assert r.code == 0 and r.json()["top1"] == want, r.err
    r = cli("convert", tmp_path / "t.pt", *plain, "--image-size", "8,8", "--out",
            tmp_path / "c.safetensors", "--json")
    assert r.code == 0 and r.json()["input"] == [1, 8, 8], r.err
    r = cli("eval", tmp_path / "c.safetensors", "--data", "digits:test", "--json")
    assert r.json()["top1"] == want
    r = cli("convert", tmp_path / "t.pt", *plain, "--out", tmp_path / "d.safetensors")
    said = " ".join(r.err.split() + r.out.split())
    assert r.code == 0 and "input 1x32x32" in said
    assert "--resize stretch: images resized to 32x32" in said
    r = cli("convert", tmp_path / "t.pt", *plain, "--resize", "crop:0.875", "--out",
            tmp_path / "e.safetensors", "--json")
    assert (r.json()["resize"], r.json()["interpolation"]) == ("crop:0.875", "bilinear")
    # without --in-chans: read from the first layer, and said so
    unsaid = [a for a in plain if a not in ("--in-chans", "1")]
    r = cli("convert", tmp_path / "t.pt", *unsaid, "--image-size", "8", "--class-names",
            ",".join("abcdefghij"), "--out", tmp_path / "f.safetensors")
    said = " ".join(r.err.split() + r.out.split())
    assert r.code == 0 and "10 classes (from 'linear.weight')" in said, r.err
    assert "input 1x8x8 (channels from 'conv1.weight')" in said
    assert cli("eval", tmp_path / "f.safetensors", "--data", "digits:test",
               "--json").json()["top1"] == want
    # a --num-classes the file contradicts names the tensor and both shapes
    _one_line_error(cli("convert", tmp_path / "t.pt", *plain, "--num-classes", "5", "--out",
                        tmp_path / "g.safetensors"), "shape mismatch", "'linear.weight'",
                    "--num-classes")
    _one_line_error(cli("convert", tmp_path / "t.pt", *unsaid, "--class-names", "a,b", "--out",
                        tmp_path / "g.safetensors"), "gives 2 names for 10 classes")
    assert not (tmp_path / "g.safetensors").exists()
    # A PyTorch Lightning checkpoint: its weights under 'state_dict', named 'model.<...>'
    import torch

    from kdtool.checkpoint import read_meta

    state = torch.load(tmp_path / "t.pt", weights_only=True)
    torch.save({"epoch": 9, "state_dict": {"model." + k: v for k, v in state.items()}},
               tmp_path / "last.ckpt")
    r = cli("convert", tmp_path / "last.ckpt", *plain, "--image-size", "8", "--out",
            tmp_path / "l.safetensors")
    assert r.code == 0, r.err
    assert "reading the weights under 'state_dict' (it also holds epoch)" in r.err
    assert "every tensor name starts with 'model.'" in " ".join(r.err.split())
    prov = read_meta(tmp_path / "l.safetensors").provenance  # kept by convert
    assert (prov["state_dict_key"], prov["stripped_prefix"]) == ("state_dict", "model.")
    assert cli("eval", tmp_path / "l.safetensors", "--data", "digits:test",
               "--json").json()["top1"] == want


@pytest.mark.parametrize(("args", "fragments"), [
    (["convert", "{pt}", "--arch", "tiny_cnn", "--mean", "0.5"], ["--mean was given without "
                                                                  "--std", "pass both"]),
    (["convert", "{pt}", "--arch", "tiny_cnn", "--std", "0.5"], ["--std was given without "
                                                                 "--mean"]),
    (["train", "--data", "digits", "--mean", "0.5", "--out", "x.safetensors"],
     ["--mean was given without --std"]),
    (["eval", "{teacher}", "--data", "digits:test", "--mean", "0.5,0.5", "--std", "0.5,0.5"],
     ["--mean has 2 values", "1 channel(s)", "give one value"]),
    (["eval", "{teacher}", "--data", "digits:test", "--mean", "0.5", "--std", "0"],
     ["--std must be positive"]),
    (["train", "--data", "digits", "--mean", "nan", "--std", "0.5", "--out", "x.safetensors"],
     ["--mean 'nan' has a value that is not a finite number"]),  # float() reads nan, inf
    (["convert", "{pt}", "--arch", "tiny_cnn", "--mean", "0.5", "--std", "inf"],
     ["--std 'inf' has a value that is not a finite number"]),
    (["convert", "{pt}", "--arch", "tiny_cnn", "--in-chans", "3", "--mean", "0.5,0.5",
      "--std", "0.5,0.5,0.5"], ["--mean has 2 values", "give 3 values, or one for all"]),
    (["eval", "{teacher}", "--data", "digits:test", "--image-size", "8"],
     ["--image-size describes a plain state_dict", "--resize rule"]),
    # it would have been read as a plain state_dict: its input size and metadata ignored
    (["eval", "{teacher}", "--data", "digits:test", "--arch", "cnn3", "--mean", "0.5", "--std",
      "0.2"], ["--arch describes a plain state_dict", "is a kdtool checkpoint", "drop --arch"]),
    (["convert", "{pt}", "--arch", "tiny_cnn", "--mean", "0.5", "--std", "0.5",
      "--image-size", "8x"], ["--image-size '8x' is not a size"]),
    (["train", "--data", "digits", "--image-size", "0", "--out", "x.safetensors"],
     ["--image-size '0' is not a size"]),
])
def test_half_or_mismatched_normalisation_and_sizes_are_refused(cli, digits_teacher, tmp_path,
                                                                monkeypatch, args, fragments):
    """Half a normalisation was quietly replaced by the data's or the default's; a value
    count for other data was cut to fit."""
    monkeypatch.chdir(tmp_path)
    _plain_copy(digits_teacher, tmp_path / "t.pt")
    args = [a.format(pt=tmp_path / "t.pt", teacher=digits_teacher) for a in args]
    _one_line_error(cli(*args), *fragments)
    assert not (tmp_path / "x.safetensors").exists()


def test_an_uncalibrated_noise_student_is_flagged_where_running_statistics_are_used(
        cli, digits_teacher, tmp_path):
    from kdtool.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(digits_teacher)
    meta.stages["distill"] = {"bn_running_stats": "noise"}  # what kdtool distill records
    student = save_checkpoint(tmp_path / "s.safetensors", model, meta, force=False)
    r = cli("eval", student, "--data", "digits:test")
    assert r.code == 0 and "BN running statistics are noise statistics" in r.err
    assert "kdtool calibrate" in r.err and "--bn current" in r.err
    assert "warning" not in cli("eval", student, "--data", "digits:test", "--bn", "current").err
    # A mistyped --data is the one line to see, not a warning about the model first.
    _one_line_error(cli("eval", student, "--data", tmp_path / "vall"), "'", "vall' not found")
    r = cli("export", student, "--onnx", tmp_path / "s.onnx", "--json")
    assert r.code == 0 and "are noise statistics" in r.json()["warning"] and "warning:" in r.err
    r = cli("bench", student, "--batch", "1", "--warmup", "1", "--min-iters", "2",
            "--min-time", "0.01", "--json")
    assert r.code == 0 and "are noise statistics" in r.err
    meta.stages["calibrate"] = {"bn_running_stats": "real"}
    save_checkpoint(student, model, meta, force=True)
    assert "warning" not in cli("eval", student, "--data", "digits:test").err


def test_a_failure_under_json_is_one_json_object_too(cli, tmp_path):
    """Scripts parse stdout: under --json an error is {"error", "hint"} there as well."""
    import json

    r = cli("eval", tmp_path / "missing.safetensors", "--data", "digits", "--json")
    assert r.code == 1 and r.err.startswith("error: ")
    got = json.loads(r.out)
    assert "missing.safetensors" in got["error"] and set(got) == {"error", "hint"}
    r = cli("models", "--json", "--bogus")
    assert r.code == 1 and "--bogus" in json.loads(r.out)["error"]
    r = cli("eval", tmp_path / "missing.safetensors", "--data", "digits")
    assert r.code == 1 and r.out == ""


def test_files_of_the_wrong_kind_get_the_command_that_fixes_them(cli, digits_teacher, tmp_path):
    import torch
    from safetensors.torch import save_file

    from kdtool.models import create_model

    torch.save(create_model("tiny_cnn"), tmp_path / "whole.pt")  # the model object, pickled
    _one_line_error(cli("eval", tmp_path / "whole.pt", "--arch", "tiny_cnn", "--mean", "0.5",
                        "--std", "0.5", "--data", "digits"),
                    "holds a pickled Python object (kdtool.models.tiny.PlainCNN)",
                    "never unpickles", "torch.save(model.state_dict(), path)")
    assert "\x1b" not in cli("eval", tmp_path / "whole.pt", "--arch", "tiny_cnn", "--mean",
                             "0.5", "--std", "0.5", "--data", "digits").err
    save_file(create_model("tiny_cnn").state_dict(), tmp_path / "plain.safetensors")
    _one_line_error(cli("info", tmp_path / "plain.safetensors"), "without kdtool metadata",
                    f"kdtool convert {tmp_path / 'plain.safetensors'} --arch ARCH")
    (tmp_path / "m.safetensors.state.pt").write_bytes(b"x")
    for command in (["info"], ["eval", "--data", "digits"]):  # not "pass --arch"
        _one_line_error(cli(command[0], tmp_path / "m.safetensors.state.pt", *command[1:]),
                        "is the run state", "use '" + "m.safetensors' itself")
    _one_line_error(cli("convert", digits_teacher, "--arch", "resnet8", "--out",
                        tmp_path / "c.safetensors"), "already a kdtool checkpoint",
                    "nothing to convert")
    assert not (tmp_path / "c.safetensors").exists()


def test_a_folder_that_cannot_be_written_is_refused_before_the_work(cli, tmp_path,
                                                                    monkeypatch):
    import os

    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) and
                        mode == os.W_OK else real(p, mode))
    r = cli("train", "--arch", "tiny_cnn", "--data", "digits", "--out", ro / "t.safetensors")
    _one_line_error(r, f"folder '{ro}' is not writable", "choose a folder you can write to")


@pytest.mark.parametrize(("number", "strerror", "hint"), [
    ("ENOSPC", "No space left on device", "free some disk space or write elsewhere"),
    ("EFBIG", "File too large", "the file is over this filesystem's (or ulimit -f's) size "
                                "limit: write elsewhere")])
def test_a_full_disk_met_late_is_one_line_not_a_traceback(cli, digits_teacher, tmp_path,
                                                         monkeypatch, number, strerror, hint):
    import errno

    import kdtool.io as kio

    out = tmp_path / "c.safetensors"

    def full(*args, **kwargs):
        raise OSError(getattr(errno, number), strerror, str(out))

    monkeypatch.setattr(kio.tempfile, "mkstemp", full)
    r = cli("calibrate", digits_teacher, "--calib-data", "digits", "--batches", "2",
            "--out", out)
    assert r.code == 1 and "Traceback" not in r.err
    assert r.err.strip().splitlines()[-1] == f"error: '{out}': {strerror} ({hint})"


def test_a_normalisation_override_on_a_checkpoint_is_warned_and_recorded(cli, digits_teacher):
    r = cli("eval", digits_teacher, "--data", "digits:test", "--mean", "0.5", "--std", "0.25",
            "--json")
    assert r.code == 0, r.err
    assert "--mean/--std override the normalisation" in " ".join(r.err.split())
    override = r.json()["normalisation_override"]
    assert override["used"] == {"mean": [0.5], "std": [0.25]}
    assert override["recorded"]["mean"] != [0.5]
    assert "normalisation_override" not in cli("eval", digits_teacher, "--data", "digits:test",
                                               "--json").json()


def test_the_hints_option_values_are_the_commands_own():
    from kdtool.cli.hints import OPTION_VALUES
    from kdtool.device import PRECISIONS as STEP
    from kdtool.export.metadata import PRECISIONS as FILE

    assert OPTION_VALUES["--precision"] == {"train": STEP, "distill": STEP, "export": FILE}


def _doc_snippets(text: str) -> list[str]:
    import re

    text = text.replace("\\\n", " ")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    snippets = [line for b in blocks for line in b.splitlines()]
    inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return snippets + [s.replace("\n", " ") for s in inline]


def _broken_references(text: str, root: Path) -> list[str]:
    """Bench scripts that do not exist or lack a documented --option, and test files or
    test names (``tests/x.py::test_y``) that do not exist, in ``text``."""
    import re

    bad = []
    for snippet in _doc_snippets(text):
        for m in re.finditer(r"python3? (bench/[\w.]+\.py)(.*)", snippet):
            script = root / m.group(1)
            if not script.is_file():
                bad.append(m.group(1))
                continue
            calls = re.findall(r"add_argument\(((?:\s*[\"'][^\"']+[\"']\s*,?)+)",
                               script.read_text())
            known = {o for c in calls for o in re.findall(r"(--[a-z0-9-]+)", c)}
            args = re.split(r"\s(?:&&|\||;)\s", m.group(2))[0]
            bad += [f"{m.group(1)} {o}" for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)",
                                                            args) if o not in known | {"--help"}]
        for path, name in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", snippet):
            if not (root / path).is_file():
                bad.append(path)
            elif name and not re.search(rf"def {name}\(", (root / path).read_text()):
                bad.append(f"{path}::{name}")
    return bad


def test_documented_bench_scripts_and_tests_exist():
    root = Path(__file__).resolve().parents[2]
    assert _broken_references("`python bench/data_load.py --draww 5`", root) == [
        "bench/data_load.py --draww"]
    assert _broken_references("```bash\npython bench/nope.py\n```", root) == ["bench/nope.py"]
    assert _broken_references("`tests/kdtool/test_cli.py::test_nope`", root) == [
        "tests/kdtool/test_cli.py::test_nope"]
    for doc in ("README.md", "docs/BENCHMARKS.md", "docs/RESULTS.md"):
        assert _broken_references((root / doc).read_text(), root) == [], doc


def test_a_message_line_is_the_first_line_of_any_exception():
    from kdtool.errors import message_line

    assert message_line(ValueError("one\ntwo")) == "one"
    assert message_line(ValueError("\n  padded\nmore")) == "padded"
    assert message_line(ValueError()) == "" and message_line(ValueError("   ")) == ""
    assert message_line(ValueError("x" * 500), 200) == "x" * 200
