#!/usr/bin/env bash
# Install everything rdsproxy's tests and benchmarks need, on a fresh Debian 12 machine.
#
# Idempotent and quick when already done: apt is only touched for packages that are
# missing. The Debian packages' own services are not started by us (the tests start
# their own throwaway clusters on free ports), and pgbouncer's packaged service is kept
# off so it never squats on 6432.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# haproxy: the MySQL bench's reference relay (bench/mysql.py); its packaged configuration
# listens on no port.
PACKAGES=(postgresql postgresql-contrib pgbouncer mariadb-server mariadb-client sysbench
          haproxy build-essential)

log() { echo "ci/install.sh: $*" >&2; }

SUDO=()
CAN_APT=1
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        CAN_APT=0
        log "not root and no sudo: skipping system packages"
    fi
fi

# Another apt/dpkg may be running (unattended upgrades, a provisioning step): wait for
# its lock instead of failing.
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q
     -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef
     -o Dpkg::Options::=--force-confold)

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

apt_update() {
    # The lists lock is not covered by DPkg::Lock::Timeout on every apt version: retry.
    local i
    for i in $(seq 1 60); do
        if "${APT[@]}" update; then return 0; fi
        log "apt-get update failed (attempt $i), retrying in 10 s"
        sleep 10
    done
    return 1
}

install_system_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "system packages already installed"
        return 0
    fi
    log "installing: ${missing[*]}"
    # Keep maintainer scripts from starting the default services (postgresql on 5432,
    # mariadb, pgbouncer) while installing, unless a policy is already in place.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 755 "$policy"
        created_policy=1
    fi
    local rc=0
    apt_update && "${APT[@]}" install --no-install-recommends "${missing[@]}" || rc=$?
    if [ "$created_policy" -eq 1 ]; then
        "${SUDO[@]}" rm -f "$policy"
    fi
    return "$rc"
}

disable_pgbouncer_service() {
    # The tests run their own pgbouncer on free ports; the packaged one would hold 6432.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl disable --now pgbouncer >/dev/null 2>&1 || true
    else
        local pidfile=/var/run/postgresql/pgbouncer.pid
        if [ -f "$pidfile" ] && "${SUDO[@]}" kill -0 "$(cat "$pidfile")" 2>/dev/null \
                && [ -x /etc/init.d/pgbouncer ]; then
            log "stopping the packaged pgbouncer service"
            "${SUDO[@]}" /etc/init.d/pgbouncer stop || true
        fi
        if command -v update-rc.d >/dev/null 2>&1 && [ -e /etc/init.d/pgbouncer ]; then
            "${SUDO[@]}" update-rc.d pgbouncer disable >/dev/null 2>&1 || true
        fi
    fi
}

if [ "$CAN_APT" -eq 1 ]; then
    install_system_packages
    disable_pgbouncer_service
fi

# Python side: the package in editable mode with its test extras, then the Cython fast path
# built in place. Each step is skipped when nothing it depends on changed.
STAMP_DIR=build
PIP_STAMP=$STAMP_DIR/install-pip.stamp
PIP_LOG=$STAMP_DIR/install-pip.log
BUILD_LOG=$STAMP_DIR/install-build.log
mkdir -p "$STAMP_DIR"

# What the pip step depends on: the declared dependencies, the build, the interpreter and
# the tree the editable install points at.
pip_inputs() {
    { cat pyproject.toml setup.py; python3 -c 'import sys; print(sys.executable, sys.version)'; pwd; } \
        | sha256sum | cut -d' ' -f1
}

# True when rdsproxy is installed editable from this tree and every requirement of
# rdsproxy[test] is installed at a version its specifier accepts.
installed_matches() {
    # -I: not this directory's rdsproxy.egg-info, which a build leaves behind.
    python3 -I - <<'PY'
import json, os, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
    dist = metadata.distribution("rdsproxy")
    origin = json.loads(dist.read_text("direct_url.json") or "{}")
except Exception:  # not installed, or no packaging to read specifiers with: run pip
    sys.exit(1)
if origin.get("url") != "file://" + os.getcwd():
    sys.exit(1)
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker and not req.marker.evaluate({"extra": "test"}):
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(version, prereleases=True):
        sys.exit(1)
PY
}

# A build's output on stdin; on stderr one line per module compiled and setup.py's
# warnings (a module that did not compile falls back to its pure-Python twin).
build_progress() {
    { grep --line-buffered -oE "building '[^']+' extension|rdsproxy: ([Cc]ython|cythonize|RDSPROXY).*" || true; } \
        | sed -u -E "s/^building '([^']+)' extension/compiling \1/; s/^/ci\/install.sh:   /" >&2
}

pip_install() {
    local args=(install --disable-pip-version-check -v -e '.[test]')
    if [ "$(id -u)" -eq 0 ]; then
        args+=(--root-user-action=ignore)
    fi
    if python3 - <<'PY'
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)
PY
    then
        # A distribution-managed interpreter (PEP 668): this is a throwaway CI/dev machine.
        args+=(--break-system-packages)
    fi
    log "python3 -m pip ${args[*]} (compiles the fast path: a minute or two; output in $PIP_LOG)"
    # pip -v streams the build's output (to the log) for build_progress.
    if ! python3 -m pip "${args[@]}" 2>&1 | tee "$PIP_LOG" | build_progress; then
        log "pip install failed; the end of $PIP_LOG:"
        tail -n 40 "$PIP_LOG" >&2
        return 1
    fi
}

# The compiled modules that are missing or older than their source or any .pxd (the C
# layouts every module cimports). By setup.py's convention a module compiled from
# <name>_py.py has <name>_c.pxd beside it, and a native one is <name>_c.pyx.
stale_extensions() {
    local suffix pxd name source
    suffix=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    for pxd in rdsproxy/_fastpath/*_c.pxd rdsproxy/_fastpath/*_c.pyx; do
        name=${pxd%_c.*}
        source=${name}_py.py
        [ "${pxd##*.}" = pyx ] && source=$pxd
        [ -f "$source" ] || continue
        local ext=${name}_c$suffix newest
        newest=$(ls -t "$source" rdsproxy/_fastpath/*.pxd | head -n 1)
        if [ ! -f "$ext" ] || [ "$newest" -nt "$ext" ]; then
            echo "${name##*/}"
        fi
    done
}

build_fastpath() {
    local stale
    stale=$(stale_extensions | paste -sd ' ')
    if [ -z "$stale" ]; then
        log "Cython fast path up to date"
        return 0
    fi
    log "building the Cython fast path in place (stale: $stale; output in $BUILD_LOG)"
    python3 setup.py build_ext --inplace 2>&1 | tee "$BUILD_LOG" | build_progress
}

inputs=$(pip_inputs)
if [ "$(cat "$PIP_STAMP" 2>/dev/null)" = "$inputs" ] && installed_matches; then
    log "rdsproxy[test] already installed from this tree"
else
    rm -f "$PIP_STAMP"
    pip_install
    echo "$inputs" >"$PIP_STAMP"
fi
build_fastpath

if python3 -c "import rdsproxy._fastpath.pg_framing_c" >/dev/null 2>&1; then
    log "Cython fast path built"
else
    log "Cython fast path NOT importable (pure-Python twins will be used)"
fi
log "done"
