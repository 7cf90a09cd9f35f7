"""The paper's analyses as commands (``kdtool analyze ...``): each writes a PNG and a CSV."""
