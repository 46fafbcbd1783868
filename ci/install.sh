#!/usr/bin/env bash
# Install everything rdsproxy's tests and benchmarks need, on a fresh Debian 12 machine.
#
# Idempotent and quick when already done: apt is only touched for packages that are
# missing. The Debian packages' own services are not started by us (the tests start
# their own throwaway clusters on free ports), and pgbouncer's packaged service is kept
# off so it never squats on 6432.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(postgresql postgresql-contrib pgbouncer mariadb-server mariadb-client sysbench
          build-essential)

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

# Python side: the package in editable mode with its test extras. This also (re)builds
# the Cython fast path in place, so a stale extension never shadows edited sources.
PIP_ARGS=(install --disable-pip-version-check -e '.[test]')
if [ "$(id -u)" -eq 0 ]; then
    PIP_ARGS+=(--root-user-action=ignore)
fi
if python3 - <<'PY'
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)
PY
then
    # A distribution-managed interpreter (PEP 668): this is a throwaway CI/dev machine.
    PIP_ARGS+=(--break-system-packages)
fi
log "python3 -m pip ${PIP_ARGS[*]}"
python3 -m pip "${PIP_ARGS[@]}"

if python3 -c "import rdsproxy._fastpath.pg_framing_c" >/dev/null 2>&1; then
    log "Cython fast path built"
else
    log "Cython fast path NOT importable (pure-Python twins will be used)"
fi
log "done"
