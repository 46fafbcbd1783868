#!/usr/bin/env bash
# Install an rdsproxy wheel into a new virtualenv and check that it runs there.
#
# Usage: deploy/install-wheel.sh WHEEL VENV
# The venv sees no other site-packages, so the checks prove that the wheel's declared
# dependencies are enough: `rdsproxy --help` runs, every module of the package (both
# engines, TLS, the MySQL RSA login) imports, and the fast path is the compiled one
# (unless RDSPROXY_PURE_PYTHON=1). The Dockerfile's runtime stage and ci/test.sh run it.
set -euo pipefail
wheel="${1:?usage: deploy/install-wheel.sh WHEEL VENV}"
venv="${2:?usage: deploy/install-wheel.sh WHEEL VENV}"

log() { echo "deploy/install-wheel.sh: $*" >&2; }

# A source tree on PYTHONPATH would count as rdsproxy installed: pip would skip the wheel.
unset PYTHONPATH PYTHONHOME

log "installing $wheel into $venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q "$wheel"
"$venv/bin/python" -m pip check --disable-pip-version-check >&2

# From / so a source tree in the working directory cannot stand in for the installed package.
cd /
"$venv/bin/rdsproxy" --help >/dev/null
want=cython
if [ "${RDSPROXY_PURE_PYTHON:-0}" != "0" ]; then want=python; fi
"$venv/bin/python" -I - "$want" <<'PY'
import importlib, pkgutil, sys
import rdsproxy
from rdsproxy import _fastpath

want = sys.argv[1]
if _fastpath.IMPLEMENTATION != want:
    sys.exit(f"fast path is {_fastpath.IMPLEMENTATION}, expected {want}")
if want == "cython" and sys.platform.startswith("linux") and _fastpath.reactor.__name__.endswith("_py"):
    sys.exit("the epoll reactor is not the compiled one")
failed = {}
for module in pkgutil.walk_packages(rdsproxy.__path__, "rdsproxy."):
    if module.name.endswith(".__main__"):  # runs the command line
        continue
    try:
        importlib.import_module(module.name)
    except ImportError as exc:
        failed[module.name] = str(exc)
if failed:
    sys.exit(f"modules that do not import with the declared dependencies: {failed}")
PY
log "ok: $("$venv/bin/rdsproxy" --version)"
