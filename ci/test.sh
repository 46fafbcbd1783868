#!/usr/bin/env bash
# Build and install the wheel as an operator would, run the whole test suite twice (Cython
# fast path, then pure Python), then the micro-benchmarks' report and the bench gate.
#
# Extra arguments are passed to both pytest runs. Exits non-zero if either run fails,
# including pytest's exit 5 ("no tests collected"), which must not pass as green.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { echo "ci/test.sh: $*" >&2; }

run_suite() {
    local label=$1; shift
    log "=== test suite: $label ==="
    local rc=0
    # Two workers, a test module each: most tests wait on servers and proxies, so the suite
    # takes about half the time on two cores. RDSPROXY_TEST_WORKERS=0 runs it in one process.
    local workers=(-n "${RDSPROXY_TEST_WORKERS:-2}" --dist loadfile)
    [ "${RDSPROXY_TEST_WORKERS:-2}" = 0 ] && workers=()
    env "$@" python3 -m pytest -q -p no:cacheprovider "${workers[@]}" tests "${PYTEST_ARGS[@]}" \
        || rc=$?
    if [ "$rc" -eq 5 ]; then
        log "$label: pytest collected no tests (exit 5); treating as failure"
        rc=1
    fi
    if [ "$rc" -ne 0 ]; then
        log "$label: FAILED (exit $rc)"
    else
        log "$label: passed"
    fi
    return "$rc"
}

# The wheel is built once and installed into a venv that sees nothing else; the install
# script checks `rdsproxy --help`, the compiled fast path and that every module imports with
# the declared dependencies. tests/test_packaging.py then reuses both in each suite run.
check_wheel() {
    log "=== packaging: build the wheel, install it into a clean venv ==="
    PACKAGING_DIR=$(mktemp -d)
    trap 'rm -rf "$PACKAGING_DIR"' EXIT
    local wheel
    wheel=$(env -u RDSPROXY_PURE_PYTHON bash deploy/build-wheel.sh "$PACKAGING_DIR/wheels") \
        && env -u RDSPROXY_PURE_PYTHON bash deploy/install-wheel.sh "$wheel" "$PACKAGING_DIR/venv" \
        || { log "packaging: FAILED"; return 1; }
    export RDSPROXY_PACKAGING_WHEEL=$wheel RDSPROXY_PACKAGING_VENV=$PACKAGING_DIR/venv
    log "packaging: passed"
}

PYTEST_ARGS=("$@")
status=0
check_wheel || status=1
# REQUIRE_CYTHON makes fast-path tests fail, not skip, when the extension is missing.
run_suite "cython" -u RDSPROXY_PURE_PYTHON RDSPROXY_REQUIRE_CYTHON=1 || status=1
run_suite "pure-python" -u RDSPROXY_REQUIRE_CYTHON RDSPROXY_PURE_PYTHON=1 || status=1

if [ "$status" -ne 0 ]; then
    log "test suite failed; skipping the bench gate"
    exit "$status"
fi

# A report, not a gate: the Cython/pure ratio of each fast-path component (~20 s). It
# fails only if a benchmark body breaks, and skips, saying so, where the C twins are missing.
if [ -z "${RDSPROXY_SKIP_BENCH:-}" ]; then
    log "=== micro-benchmarks (report) ==="
    env -u RDSPROXY_PURE_PYTHON python3 -m bench.micro || { log "micro-benchmarks FAILED"; exit 1; }
fi

if [ -f ci/bench_gate.sh ] && [ -z "${RDSPROXY_SKIP_BENCH:-}" ]; then
    log "=== bench gate ==="
    bash ci/bench_gate.sh || { log "bench gate FAILED"; exit 1; }
fi
log "all passed"
