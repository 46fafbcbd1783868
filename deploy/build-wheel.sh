#!/usr/bin/env bash
# Build rdsproxy's wheel, with the Cython fast path compiled, into the directory given.
#
# Usage: deploy/build-wheel.sh OUTDIR
# It builds from a clean copy of the package sources, so a development tree's in-place
# extensions, generated C and build/ never reach the wheel. setup.py falls back to pure
# Python when a module does not compile; a deployment must know, so this fails instead
# (unless RDSPROXY_PURE_PYTHON=1 asks for the pure-Python wheel). The Dockerfile's build
# stage and ci/test.sh both run it.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: deploy/build-wheel.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

log() { echo "deploy/build-wheel.sh: $*" >&2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -C "$src" --exclude=__pycache__ --exclude='*.so' --exclude='*.c' --exclude='*.html' \
    -cf - pyproject.toml setup.py MANIFEST.in README.md LICENSE rdsproxy | tar -C "$work" -xf -

log "building the wheel in $work (compiling the fast path takes a minute or two)"
# One rdsproxy wheel in OUTDIR: the one just built is the one printed.
rm -f "$out"/rdsproxy-*.whl
python3 -m pip wheel --disable-pip-version-check --no-deps -w "$out" "$work" >&2
wheel=$(echo "$out"/rdsproxy-*.whl)

if [ "${RDSPROXY_PURE_PYTHON:-0}" = "0" ]; then
    # Every module setup.py lists must be in the wheel compiled.
    python3 - "$wheel" "$work/setup.py" <<'PY'
import ast, sys, zipfile
wheel, setup = sys.argv[1:]
lists = {}
for node in ast.walk(ast.parse(open(setup).read())):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) \
            and node.targets[0].id in ("FASTPATH_MODULES", "NATIVE_MODULES"):
        value = node.value.body if isinstance(node.value, ast.IfExp) else node.value
        lists[node.targets[0].id] = ast.literal_eval(value)
expected = lists["FASTPATH_MODULES"] + (lists["NATIVE_MODULES"] if sys.platform.startswith("linux") else [])
built = {n.rsplit("/", 1)[-1].split(".")[0] for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")}
missing = sorted(f"{m}_c" for m in expected if f"{m}_c" not in built)
if missing:
    sys.exit(f"deploy/build-wheel.sh: {wheel} lacks compiled modules {missing}: see the build output")
PY
fi
log "built $wheel"
echo "$wheel"
