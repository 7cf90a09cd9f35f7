"""kdtool's spelling of options that users bring from other tools.

Click suggests options whose names look alike (``--optimiser`` -> ``--optimizer``); these
are options that look nothing alike but mean the same: Ultralytics' ``--format`` and
``--half``, timm's ``--model`` and ``-b``, trtexec's ``--fp16``. Each entry lists kdtool's
candidates in order; the hint names those the command has, so it never points at an option
the command lacks.
"""

from __future__ import annotations

# option users type -> kdtool's equivalents (option, optionally with its value)
FOREIGN_OPTIONS: dict[str, list[str]] = {
    "--output": ["--out", "--onnx", "--csv"],
    "--output-format": ["--json"],
    "-o": ["--out", "--onnx", "--csv"],
    # Ultralytics' export --format, or an output format elsewhere (--format json).
    "--format": ["--precision fp32|fp16|int8", "--trt", "--formats", "--json"],
    # export's --precision is the file's (fp16), train's and distill's the step's (bf16)
    "--half": ["--precision fp16", "--precision bf16"],
    "--fp16": ["--precision fp16", "--precision bf16"],
    "--bf16": ["--precision bf16"],
    "--amp": ["--precision bf16"],
    "--int8": ["--precision int8"],
    "--dynamic": ["--batch MIN:OPT:MAX"],
    "--model": ["--arch", "--student", "--teacher"],
    "--weights": ["--teacher"],
    "-b": ["--batch-size", "--batch", "--max-batch"],
    "--bs": ["--batch-size", "--batch", "--max-batch"],
    "--batch": ["--batch-size"],
    "--lr0": ["--lr"],
    "--data-dir": ["--data"],
    "--dataset": ["--data"],
    "--calib": ["--calib-data"],
    "--val-data": ["--val"],
    # kdtool's own spellings across commands: labelled data is --data where a command
    # takes only one dataset (eval, bench) and --val beside other inputs (train, distill,
    # calibrate, export); a student is an --arch in train and a --student in distill.
    "--val": ["--data"],
    "--data": ["--val", "--calib-data"],
    "--calib-data": ["--data"],
    "--arch": ["--student"],
    "--num-epochs": ["--epochs"],
    "--iters": ["--iters-per-epoch"],
    "--steps": ["--iters-per-epoch"],
    "--overwrite": ["--force"],
    "--exist-ok": ["--force"],
    "--cpu": ["--device cpu"],
    "--gpu": ["--device cuda"],
    "--cuda": ["--device cuda"],
    # Where a model runs: --device (torch), --provider (serve), --backends / --backend
    # (bench / predict, which run every kind of model file).
    "--device": ["--backend", "--backends", "--provider"],
    "--provider": ["--backend", "--backends", "--device"],
    "--backend": ["--backends", "--provider", "--device"],
    "--backends": ["--backend", "--provider", "--device"],
    "--top-k": ["--top"],
    "--topk": ["--top"],
    "-k": ["--top"],
    # serve batches requests up to --max-batch; it has no batch of its own
    "--batch-size": ["--batch", "--max-batch"],
}

# Where the model file is a command's first argument (serve, predict, bench, export, eval,
# calibrate, info), an option naming it gets that answer instead.
MODEL_OPTIONS = ("--model", "--models", "--checkpoint", "--ckpt", "--weights", "-m")
MODEL_ARGUMENTS = ("model", "models", "checkpoint", "checkpoints")


# The values an option takes in each command that has it, where commands differ: a
# candidate "--option VALUE" is offered only where VALUE is one of them (tests check these
# against kdtool.device.PRECISIONS and kdtool.export.metadata.PRECISIONS).
OPTION_VALUES: dict[str, dict[str, tuple[str, ...]]] = {
    "--precision": {"train": ("auto", "fp32", "bf16"), "distill": ("auto", "fp32", "bf16"),
                    "export": ("fp32", "fp16", "int8")},
}


# Options that mean two things in a command: (options the command has, the whole hint),
# tried in order before FOREIGN_OPTIONS. In distill (and analyze sweep) --arch may describe
# the student, or a plain PyTorch state_dict teacher: --teacher takes a kdtool checkpoint
# only, so that teacher is converted first (naming --student alone would silently change
# the student's architecture instead).
TWO_MEANINGS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "--arch": [(("--student", "--teacher"),
                "; kdtool spells it --student for the student's architecture; a plain PyTorch "
                "state_dict teacher becomes a kdtool checkpoint first: 'kdtool convert T.pt "
                "--arch ARCH --out T.safetensors', then --teacher T.safetensors")],
}


def foreign_option_hint(option: str, command_options: set[str],
                        command: str | None = None) -> str | None:
    """``"; kdtool spells it --precision fp16"`` for the candidates the command has (with a
    value the command takes), else None."""
    for needs, hint in TWO_MEANINGS.get(option, []):
        if set(needs) <= command_options:
            return hint

    def offered(candidate: str) -> bool:
        name, *value = candidate.split(maxsplit=1)
        if name not in command_options:
            return False
        takes = OPTION_VALUES.get(name, {}).get(command or "")
        return not value or takes is None or set(value[0].split("|")) <= set(takes)

    have = [c for c in FOREIGN_OPTIONS.get(option, []) if offered(c)]
    if not have:
        return None
    return "; kdtool spells it " + " or ".join(have)
