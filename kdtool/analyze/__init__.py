"""The paper's analyses as commands (``kdtool analyze ...``): each writes a PNG and a CSV."""

from kdtool.errors import KdtoolError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise KdtoolError("kdtool analyze draws its plots with matplotlib, which is not "
                          "installed", "pip install 'kdtool[plot]'") from None
