"""A private, frozen copy of the rdsproxy source with its Cython fast path built.

Charter: the benchmark must measure one version of the proxy even while colleagues edit
the tree, and must not drop build artifacts into the repository. So the suite copies
rdsproxy/ + setup.py (+ pyproject.toml) into /tmp/rdsproxy-bench-build/<source hash>/,
runs `setup.py build_ext --inplace` there, and starts both rdsproxy variants from that
copy. The copy is cached by content hash, so a re-run of unchanged source costs nothing.
If the Cython build fails, the copy still runs (the proxy itself falls back to its
pure-Python twins); the report says which implementation each variant really used.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.procs import log

CACHE_ROOT = Path("/tmp/rdsproxy-bench-build")
_KEEP = 4  # cached builds kept (newest first)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.so", "*.c", "*.html", "build", "*.egg-info")


def _source_files(repo: Path):
    yield repo / "setup.py"
    yield repo / "pyproject.toml"
    for root, dirs, files in os.walk(repo / "rdsproxy"):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith((".py", ".pyx", ".pxd", ".pxi", ".toml", ".json", ".sql")):
                yield Path(root) / f


def source_hash(repo: Path) -> str:
    h = hashlib.sha256()
    for path in _source_files(repo):
        if path.exists():
            h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def implementation(tree: Path, pure: bool) -> tuple[str, str]:
    """(IMPLEMENTATION, rdsproxy.__file__) as a process started from `tree` would see them."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("RDSPROXY_PURE_PYTHON", None)
    if pure:
        env["RDSPROXY_PURE_PYTHON"] = "1"
    res = subprocess.run([sys.executable, "-c", "import rdsproxy, rdsproxy._fastpath as f; "
                          "print(f.IMPLEMENTATION); print(rdsproxy.__file__)"],
                         capture_output=True, text=True, env=env, cwd=tree, timeout=120)
    if res.returncode != 0:
        return "unimportable", res.stderr.strip().splitlines()[-1:][0] if res.stderr else ""
    impl, where = (res.stdout.strip().splitlines() + ["", ""])[:2]
    return impl, where


def prepare(repo: Path, *, build: bool = True) -> dict:
    """Snapshot (and build) the source; returns {'tree','hash','build_log','built'}."""
    digest = source_hash(repo)
    dest = CACHE_ROOT / digest
    marker = dest / ".bench-build"
    if marker.exists():
        os.utime(dest)  # mark as recently used for the pruning below
        return {"tree": dest, "hash": digest, "built": marker.read_text().strip(),
                "build_log": "(cached)"}
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_ROOT / f".{digest}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copytree(repo / "rdsproxy", tmp / "rdsproxy", ignore=_IGNORE)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (repo / name).exists():
            shutil.copy2(repo / name, tmp / name)
    build_log, status = "", "not built (--no-build)"
    if build:
        t0 = time.monotonic()
        log(f"building the Cython fast path in a private copy ({tmp}) ...")
        env = {k: v for k, v in os.environ.items() if k != "RDSPROXY_PURE_PYTHON"}
        returncode, build_log = _build_with_progress(tmp, env, t0)
        status = "ok" if returncode == 0 else f"setup.py exit {returncode}"
        if not list((tmp / "rdsproxy").rglob("*.so")):
            status = "no extension built"
        log(f"build: {status} ({time.monotonic() - t0:.0f}s)")
    (tmp / ".bench-build").write_text(status + "\n")
    (tmp / ".bench-build.log").write_text(build_log)
    try:
        tmp.rename(dest)
    except OSError:  # a concurrent run won the race; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    _prune()
    return {"tree": dest, "hash": digest, "built": status, "build_log": build_log}


_BUILDING = re.compile(r"building '([\w.]+)' extension")


def _build_with_progress(tree: Path, env: dict, t0: float, timeout: float = 900) -> tuple[int, str]:
    """setup.py build_ext in `tree`, saying which extension it compiles as it goes (the
    build takes about a minute); (exit status, the output's tail)."""
    proc = subprocess.Popen([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        tail = (tail + [line])[-60:]
        m = _BUILDING.search(line)
        if m:
            log(f"  compiling {m.group(1)} ({time.monotonic() - t0:.0f}s)")
        if time.monotonic() > deadline:
            proc.kill()
            break
    return proc.wait(), "".join(tail)[-4000:]


def _prune() -> None:
    dirs = sorted((d for d in CACHE_ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for old in dirs[_KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
