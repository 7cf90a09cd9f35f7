# Sourced by the device scripts: make `python3 -m kdtool` run this checkout's code. An
# editable install of another checkout is left alone (installing this one over it would
# repoint that environment here): the script stops and says so.
# Usage: . bench/install_here.sh LOGFILE
installed=$(cd / && python3 -c "import kdtool.distill, pathlib; print(pathlib.Path(kdtool.distill.__file__).resolve().parents[1])" 2>/dev/null)
if [ -n "$installed" ] && [ "$installed" != "$(pwd -P)" ]; then
  echo "this Python imports kdtool from $installed, not from this checkout ($(pwd -P)):" \
    "run the script there, or from an environment without kdtool" >&2
  exit 2
fi
[ -n "$installed" ] || python3 -m pip install -q -e . --no-deps --no-build-isolation >"$1" 2>&1 \
  || { echo "pip install -e . failed (see $1)" >&2; exit 2; }
