"""The README's snippets, run as a reader pastes them: the quick start, the MySQL quick start,
the configuration examples and the embedding example."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from proxyproc import REPO
from rdsproxy.config import config_from_dict, tomllib
from utils import port_is_open, run_cmd

README = os.path.join(REPO, "README.md")


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks of `language`, in order."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


def block(language: str, first_line: str) -> str:
    found = [b for b in blocks(language) if b.startswith(first_line)]
    assert len(found) == 1, f"one {language} block starting {first_line!r}, found {len(found)}"
    return found[0]


def stop(proc: subprocess.Popen) -> str:
    """SIGINT (Ctrl-C) to the process group, then what it wrote."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def test_every_toml_block_is_a_valid_config(tmp_path):
    tomls = blocks("toml")
    assert len(tomls) >= 2
    example = tomllib.loads(block("toml", 'name = "my-postgres-proxy"'))
    for text in tomls:
        data = tomllib.loads(text)
        if "targets" not in data:
            data = {**example, **data}   # a fragment: what it adds to the full example
        # The files it names (certificates) are the reader's: stand-ins where it looks.
        named = [v for k, v in data.get("tls", {}).items() if k.endswith("_file")]
        named += [t["tls_ca_file"] for t in data.get("targets", []) if "tls_ca_file" in t]
        for path in named:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).touch()
        config_from_dict(data, source="README", base_dir=tmp_path)


def test_quick_start_serves_and_psql_connects_as_printed():
    command = block("sh", "bash ci/install.sh && python3 -m rdsproxy serve").splitlines()[0]
    # The install half is what CI has just run; the reader's next step is the proxy.
    serve = command.split("&&", 1)[1].split("#", 1)[0].strip()
    assert serve == "python3 -m rdsproxy serve"
    if port_is_open(6432):
        pytest.skip("something already listens on 127.0.0.1:6432, the quick start's port")
    proc = subprocess.Popen(shlex.split(serve), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:"
                                                      f"{os.environ['PATH']}"})
    lines = []
    try:
        deadline = time.monotonic() + 120
        while not any("psql" in line for line in lines) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        psql = next(line.strip() for line in lines if "psql" in line)
        for _ in range(100):
            if port_is_open(6432):
                break
            time.sleep(0.1)
        result = run_cmd(["bash", "-c", psql + " -Atc 'select 40 + 2'"], check=False, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "42"
    finally:
        out = stop(proc)
    assert proc.returncode == 0, "".join(lines) + out


@pytest.mark.skipif(shutil.which("mariadb") is None, reason="no mariadb client")
def test_mysql_quick_start_as_pasted(tmp_path):
    """Needs the machine's MariaDB on 3306 with root access over its socket, as the README
    says; skipped where there is none."""
    if not port_is_open(3306):
        pytest.skip("no MariaDB on 127.0.0.1:3306")
    if run_cmd(["mariadb", "-e", "SELECT 1"], check=False, timeout=30).returncode != 0:
        pytest.skip("no root access to the local MariaDB")
    if port_is_open(6033):
        pytest.skip("something already listens on 127.0.0.1:6033, the example's port")
    config = block("toml", "# mysql-proxy.toml")
    (tmp_path / "mysql-proxy.toml").write_text(config)
    script = block("sh", "mkdir -p secrets")
    bin_dir = os.path.dirname(sys.executable)
    # Output to a file: the proxy the script leaves in the background keeps it open.
    with open(tmp_path / "out.txt", "w") as out_file:
        proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, stdout=out_file,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
        try:
            proc.wait(timeout=120)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGINT)   # the script's background `rdsproxy serve`
            except ProcessLookupError:
                pass
    out = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 0, out
    # The background proxy logs to the same file, before or after the client's answer.
    rows = [line.split("\t") for line in out.splitlines() if line.count("\t") == 1]
    assert any(id_.isdigit() and int(id_) > 0 and "MariaDB" in version
               for id_, version in rows), out


def test_embedding_example_runs_from_the_repository_root():
    code = block("python", "import asyncio")
    result = run_cmd([sys.executable, "-c", code], cwd=REPO, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    host, port, _pool = result.stdout.split(" ", 2)
    assert host == "127.0.0.1" and int(port) == 6432
