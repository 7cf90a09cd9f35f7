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
    "--half": ["--precision fp16"],
    "--fp16": ["--precision fp16"],
    "--bf16": ["--precision bf16"],
    "--amp": ["--precision bf16"],
    "--int8": ["--precision int8"],
    "--dynamic": ["--batch MIN:OPT:MAX"],
    "--model": ["--arch", "--student", "--teacher"],
    "--weights": ["--teacher"],
    "-b": ["--batch-size", "--batch"],
    "--bs": ["--batch-size", "--batch"],
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


def foreign_option_hint(option: str, command_options: set[str]) -> str | None:
    """``"; kdtool spells it --precision fp16"`` for the candidates the command has, else None."""
    for needs, hint in TWO_MEANINGS.get(option, []):
        if set(needs) <= command_options:
            return hint
    have = [c for c in FOREIGN_OPTIONS.get(option, []) if c.split()[0] in command_options]
    if not have:
        return None
    return "; kdtool spells it " + " or ".join(have)
