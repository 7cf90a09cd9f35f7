"""Option tables in ``--help`` that stay readable in an 80-column terminal.

typer gives the negative spelling of a boolean flag (``--no-channels-last``) a table column
of its own. One long negative widens every row's name columns, and at 80 columns (an SSH
session on a Jetson) the descriptions shrink to a word or two a line and long option names
end in an ellipsis. kdtool names the negative in the flag's description instead; parsing
is unchanged.

A default described in words (``show_default="1e-4"``, where the option's own default is
None so that kdtool can tell whether it was given) prints as typer prints a computed one,
in parentheses: ``[default: (1e-4)]``. kdtool prints it as it prints any other default.
"""

from __future__ import annotations


def _as_written(text: str):
    """A stand-in for typer's default-string method: ``text`` without parentheses."""
    return lambda **_: text


def negatives_in_descriptions() -> None:
    """Patch typer's option panel (private API: without it, help keeps typer's layout)."""
    try:
        from typer import rich_utils
    except ImportError:
        return
    real = getattr(rich_utils, "_print_options_panel", None)
    if real is None or getattr(real, "kdtool_patched", False):
        return

    def options_panel(**kwargs):
        moved, described = [], []
        for param in kwargs.get("params") or ():
            if isinstance(getattr(param, "show_default", None), str):
                described.append(param)
                param._get_default_string = _as_written(param.show_default)
            negatives = [o for o in getattr(param, "secondary_opts", None) or () if
                         o.startswith("--")]
            if not negatives:
                continue
            moved.append((param, param.secondary_opts, param.help))
            param.secondary_opts = []
            text = param.help or ""
            if negatives[0] not in text:
                param.help = f"{text} {negatives[0]} turns it off.".strip()
        try:
            return real(**kwargs)
        finally:
            for param, secondary, text in moved:
                param.secondary_opts, param.help = secondary, text
            for param in described:
                del param._get_default_string

    options_panel.kdtool_patched = True
    rich_utils._print_options_panel = options_panel
