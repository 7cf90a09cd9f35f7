"""The typer application and the one place where errors become exit codes."""

from __future__ import annotations

import atexit
import contextlib
import inspect
import math
import re
import sys
import typing
from pathlib import PurePath

import typer

try:  # typer >= 0.22 vendors its own copy of click
    from typer._click.exceptions import NoSuchOption, UsageError
except ImportError:  # older typer runs on click itself
    from click.exceptions import NoSuchOption, UsageError

from kdtool import __version__, console
from kdtool.cli.helpfmt import negatives_in_descriptions
from kdtool.cli.hints import FOREIGN_OPTIONS, MODEL_ARGUMENTS, MODEL_OPTIONS, foreign_option_hint
from kdtool.errors import ENVIRONMENT_ERRNOS, KdtoolError, message_line
from kdtool.interrupts import Stopped, describe, sigterm_as_interrupt
from kdtool.runinfo import set_command_line

negatives_in_descriptions()
app = typer.Typer(
    name="kdtool",
    help="Turn a trained image classifier into a small, fast student without its training "
    "data (noise-engineered data-free knowledge distillation), then calibrate, export "
    "and deploy it.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """kdtool: data-free distillation of image classifiers for the edge."""


def _error(message: str) -> None:
    # One plain line: no rich wrapping, so a long path never splits the message.
    prefix = "\x1b[1;31merror:\x1b[0m" if sys.stderr.isatty() else "error:"
    sys.stderr.write(f"{prefix} {message}\n")
    sys.stderr.flush()


def _fail(argv: list[str] | None, message: str, hint: str | None) -> typing.NoReturn:
    """A user's error or the machine's state: one line on stderr (and the JSON object under
    --json), exit 1."""
    _error(str(KdtoolError(message, hint)))
    _json_error(argv, message, hint)
    sys.exit(1)


def _json_error(argv: list[str] | None, message: str, hint: str | None) -> None:
    """Under --json, a failure is also the one JSON object on stdout: a script reads
    {"error", "hint"} where it would have read the result."""
    args = sys.argv[1:] if argv is None else argv
    if "--json" in args and not console.json_emitted and not console.out.quiet:
        import json

        sys.stdout.write(json.dumps({"error": message, "hint": hint}) + "\n")
        sys.stdout.flush()


_LIST_ITEM = re.compile(r"\s*([-*]|\d+[.)])\s")


def reflow(doc: str) -> str:
    """Join a docstring's wrapped lines into one line per paragraph or list item.

    Rich help keeps single line breaks, so source-wrapped docstrings came out as ragged
    half-lines in a terminal of another width; rich re-wraps the joined text to fit.
    """
    paragraphs = []
    for block in doc.split("\n\n"):
        lines: list[str] = []
        for line in block.splitlines():
            if lines and not _LIST_ITEM.match(line):
                lines[-1] += " " + line.strip()
            else:
                lines.append(line.strip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _reflow_help(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = reflow(inspect.getdoc(info.callback) or "")
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


def _usage_message(e: UsageError) -> str:
    if isinstance(e, NoSuchOption) and e.ctx is not None:
        options = {o for p in e.ctx.command.params for o in (*p.opts, *p.secondary_opts)}
        model = next((q.name for q in e.ctx.command.params
                      if q.param_type_name == "argument" and q.name in MODEL_ARGUMENTS), None)
        if model is not None and e.option_name in MODEL_OPTIONS:
            return (f"No such option: {e.option_name}; the model is the first argument: "
                    f"{e.ctx.command_path} {model.upper()} ...")
        hint = foreign_option_hint(e.option_name, options, e.ctx.command.name)
        if hint is not None:
            return f"No such option: {e.option_name}{hint}"
        elsewhere = _commands_with(e.option_name, e.ctx.find_root().command)
        if elsewhere:  # what the user meant, rather than click's look-alikes here
            named = [f"'{c}'" for c in elsewhere[:3]]
            last = f"{len(elsewhere) - 3} more" if len(elsewhere) > 3 else named.pop()
            listed = ", ".join(named) + " and " + last if named else last
            return f"No such option: {e.option_name}; it is an option of {listed}"
        if e.option_name in FOREIGN_OPTIONS:  # a setting we know, and this command lacks
            return (f"No such option: {e.option_name}; '{e.ctx.command_path}' has no setting "
                    "of that kind")
        # click's look-alikes, never --help (it names no setting)
        alike = [o for o in e.possibilities or [] if o != "--help"]
        if alike:
            return f"No such option: {e.option_name}; did you mean {' or '.join(alike)}?"
        return f"No such option: {e.option_name}"
    return e.format_message()


def _commands_with(option: str, root) -> list[str]:
    """The kdtool commands (``kdtool convert``, ``kdtool analyze sweep``) that take ``option``."""
    found = []

    def walk(command, path: str) -> None:
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                walk(sub, f"{path} {name}")
        elif any(option in (*q.opts, *q.secondary_opts) for q in command.params):
            found.append(path)

    walk(root, "kdtool")
    return found


# No kdtool count, size or seed needs more; beyond it values overflow C integers deep in
# torch or numpy (a seed of 10**16, --threads 10**12) instead of meeting a clear check.
MAX_INT_OPTION = 2**31 - 1


def _bound_numbers(param) -> None:
    """Every number option: a float must be finite (NaN slipped past every range check, and
    --lr inf wrote a checkpoint of NaNs) and an integer within MAX_INT_OPTION."""
    process = getattr(param, "process_value", None)
    if process is None or getattr(process, "kdtool_bounded", False):
        return

    def bounded(ctx, value):
        out = process(ctx, value)
        for v in out if isinstance(out, (list, tuple)) else (out,):
            name = (param.opts or [param.name])[0]
            if isinstance(v, float) and not math.isfinite(v):
                raise KdtoolError(f"{name} must be a finite number, not {v}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT_OPTION:
                raise KdtoolError(f"{name} {v} is out of range", f"kdtool takes at most "
                                  f"{MAX_INT_OPTION:,} here")
        return out

    bounded.kdtool_bounded = True
    param.process_value = bounded


def _prepare_params(command) -> None:
    """Every option of ``command`` and its subcommands, as kdtool presents and checks them:
    flags shown without a type (newer typer labels them <bool>, which reads as if
    '--force true' were the way to pass one), list options naming their items, and every
    number bounded (finite, within an int32: _bound_numbers)."""
    for sub in (getattr(command, "commands", None) or {}).values():
        _prepare_params(sub)
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        _name_list_items(param)
        _bound_numbers(param)
    make_help_option = command.get_help_option

    def get_help_option(ctx):  # click builds --help afresh for each context
        option = make_help_option(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option


def _name_list_items(param) -> None:
    """A list of paths reads <list[Path]> in newer typer's --help: show <path> (the name
    column already ends in '...')."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None or not getattr(desc, "is_list", False):
        return
    (item,) = typing.get_args(desc.annotation) or (str,)
    label = "path" if isinstance(item, type) and issubclass(item, PurePath) else \
        getattr(item, "__name__", "value").lower()
    param.display_type = lambda ctx, label=label: f"<{label}>"


def _carry_interrupts(command) -> None:
    """Wrap every command's callback so that an interrupt leaves it as ``Stopped``."""
    for sub in getattr(command, "commands", {}).values():
        _carry_interrupts(sub)
    callback = command.callback
    if callback is None or getattr(callback, "_carries_interrupts", False):
        return

    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise Stopped(e) from e

    run._carries_interrupts = True
    command.callback = run


def _stopped(argv: list[str] | None, interrupt: BaseException | None, hint: str | None):
    what, status = describe(interrupt)
    console.warn(f"{what}: {hint}" if hint else what)
    _json_error(argv, what, hint)
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 1; bugs keep their traceback."""
    set_command_line(sys.argv[1:] if argv is None else argv)
    _reflow_help(app)
    command = typer.main.get_command(app)
    _prepare_params(command)
    _carry_interrupts(command)
    console.reset()
    try:
        with sigterm_as_interrupt():
            code = command.main(args=argv, prog_name="kdtool", standalone_mode=False)
    except KdtoolError as e:
        _fail(argv, e.message, e.hint)
    except UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "kdtool"
        _fail(argv, _usage_message(e), f"see '{where} --help'")
    except OSError as e:
        hint = ENVIRONMENT_ERRNOS.get(e.errno)
        if hint is None:  # not the machine's state: a bug, with its traceback
            raise
        _fail(argv, f"'{e.filename}': {e.strerror}" if e.filename else str(e.strerror or e),
              hint)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _out_of_memory(e):
            raise  # a bug, with its traceback
        _fail(argv, f"out of memory: {_first_line(e) or type(e).__name__}",
              "use a smaller --batch-size, image size, noise pool or model, or a machine with "
              "more memory")
    except Stopped as e:
        _stopped(argv, e.interrupt, e.hint)
    except (typer.Abort, KeyboardInterrupt) as e:
        # Outside a command (parsing options); older typer and click turn an interrupt
        # escaping a command into Abort, the interrupt its cause.
        _stopped(argv, e if isinstance(e, KeyboardInterrupt) else e.__cause__, None)
    if argv is None:  # the program itself, not a caller in its own process (tests)
        _late_signals_keep_status(code or 0)
    sys.exit(code or 0)


# What torch (CPU and CUDA) and numpy say when an allocation fails.
_OOM = re.compile(r"can't allocate memory|out of memory|Unable to allocate", re.I)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or bool(_OOM.search(str(e)))


def _first_line(e: BaseException) -> str:
    """The allocation failure in a line (torch's starts with a C++ source location)."""
    text = message_line(e)
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*", "", text)[:300]


_finished_status: list[int] = []  # the program's own run finished with this status


def _late_signals_keep_status(code: int) -> None:
    """The command is done and its files written: a Ctrl-C or SIGTERM during the second or
    so of interpreter shutdown (torch and ONNX Runtime tearing down) ends the process at
    once with the command's own status, not 130 or 143 for a job a scheduler would then
    count as failed. (Past the last exit hook, ``_ignore_late_signals`` takes over.)"""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    _finished_status.append(code)

    def finish(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, finish)


def _ignore_late_signals() -> None:
    """The last exit hook (registered as the CLI loads, before torch and the others that
    register theirs later and so run earlier): from here on a late signal is ignored.
    Finalisation resets Python's own handlers to the default action, which would end a
    finished command with 143 while its modules tear down; it keeps an ignored signal
    ignored."""
    if _finished_status:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


atexit.register(_ignore_late_signals)
