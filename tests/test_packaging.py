"""What an operator deploys: the wheel (compiled, stripped, no generated C), a plain
`pip install` of it running both engines, the systemd unit and the container image's
recipe. A module imported by a code path and left to an extra fails at run time, on the
user's machine, so the declared dependencies are checked statically and in a clean venv.

ci/test.sh builds the wheel and its venv once (RDSPROXY_PACKAGING_WHEEL and
RDSPROXY_PACKAGING_VENV); run alone, these tests build their own with the same scripts."""
from __future__ import annotations

import ast
import configparser
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import psycopg
import pymysql
import pytest

from harness import APP_DB, APP_PASSWORD, APP_USER, proxy_config
from proxyproc import dump_toml
from utils import free_port, libpq_dsn, wait_for_port

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Imports that are optional by design, each behind a documented extra or a fallback.
OPTIONAL = {
    "boto3": "aws", "botocore": "aws",   # aws-secretsmanager: secret references only
    "cython": None,                      # the fast path's twins run without it (compiled: build time)
}
# Import names whose distribution is named otherwise (botocore comes with boto3).
DISTRIBUTION = {"botocore": "boto3"}


def third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / "rdsproxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "rdsproxy":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def declared(requirements) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower() for req in requirements}


def test_every_import_of_the_package_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = declared(project["dependencies"])
    extras = {name: declared(reqs) for name, reqs in project["optional-dependencies"].items()}
    missing = {}
    for module, where in third_party_imports().items():
        distribution = DISTRIBUTION.get(module, module).lower()
        if module in OPTIONAL:
            extra = OPTIONAL[module]
            assert extra is None or distribution in extras[extra], (module, extra)
            continue
        if distribution not in required:
            missing[module] = sorted(where)
    assert not missing, f"imported but not in [project] dependencies: {missing}"


# --- the wheel and a clean venv it is installed in ------------------------------------------

DEPLOY = ROOT / "deploy"


def run_script(*args, env=None) -> str:
    out = subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"{args} failed:\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    if os.environ.get("RDSPROXY_PACKAGING_WHEEL"):
        return pathlib.Path(os.environ["RDSPROXY_PACKAGING_WHEEL"])
    out = tmp_path_factory.mktemp("wheel")
    # The compiled wheel whatever mode the suite runs in.
    return pathlib.Path(run_script(DEPLOY / "build-wheel.sh", out,
                                   env={"RDSPROXY_PURE_PYTHON": "0"}).strip())


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> pathlib.Path:
    if os.environ.get("RDSPROXY_PACKAGING_VENV"):
        return pathlib.Path(os.environ["RDSPROXY_PACKAGING_VENV"])
    venv = tmp_path_factory.mktemp("venv") / "rdsproxy"
    run_script(DEPLOY / "install-wheel.sh", wheel, venv, env={"RDSPROXY_PURE_PYTHON": "0"})
    return venv


def clean_env() -> dict:
    """The environment without the suite's own module path or fast-path switches."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "RDSPROXY_PURE_PYTHON", "RDSPROXY_REQUIRE_CYTHON")}


def section_names(shared_object: str) -> set[str]:
    out = subprocess.run(["readelf", "-S", "--wide", shared_object], capture_output=True,
                         text=True, check=True)
    return set(re.findall(r"\]\s+(\.\S+)", out.stdout))


def test_wheel_ships_stripped_extensions_and_no_generated_c(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".c", ".html", ".o"))]
    compiled = [n for n in names if n.endswith(".so")]
    assert {n.split("/")[-1].split(".")[0] for n in compiled} >= {"pg_relay_c", "pool_c",
                                                                  "reactor_c"}
    # The sources stay: the pure twins, their pxd contracts, the native module's pyx.
    assert "rdsproxy/_fastpath/pg_relay_py.py" in names
    assert "rdsproxy/_fastpath/pg_relay_c.pxd" in names
    assert "rdsproxy/_fastpath/reactor_c.pyx" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    zipfile.ZipFile(wheel).extractall(tmp_path, compiled)
    for name in compiled:
        sections = section_names(str(tmp_path / name))
        assert ".text" in sections, name  # readelf read it
        assert not {".symtab", ".debug_info", ".debug_line"} & sections, (name, sections)


def test_pure_python_wheel_builds_and_runs_without_extensions(venv, tmp_path):
    # RDSPROXY_PURE_PYTHON=1 builds no extension: a wheel for any platform, pure twins only.
    pure = pathlib.Path(run_script(DEPLOY / "build-wheel.sh", tmp_path / "wheels",
                                   env={"RDSPROXY_PURE_PYTHON": "1"}).strip())
    assert pure.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(pure).namelist()
    assert not [n for n in names if n.endswith((".so", ".c"))]
    target = tmp_path / "site"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(target), str(pure)], check=True, timeout=300)
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import rdsproxy, rdsproxy.engines.postgres.engine, rdsproxy.engines.mysql.engine;"
         "from rdsproxy import _fastpath; print(rdsproxy.__file__, _fastpath.IMPLEMENTATION)"],
        capture_output=True, text=True, cwd="/", timeout=60,
        env={**clean_env(), "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(target / "rdsproxy" / "__init__.py"), "python"]


def test_installed_wheel_imports_only_from_its_venv(venv):
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c",
         "import sys, rdsproxy; from rdsproxy import _fastpath;"
         "print(rdsproxy.__file__, _fastpath.IMPLEMENTATION, _fastpath.reactor.__name__);"
         "print(sorted(p for p in sys.path if 'site-packages' in p))"],
        capture_output=True, text=True, cwd="/", timeout=60, env=clean_env())
    assert out.returncode == 0, out.stderr
    where, implementation, reactor = out.stdout.splitlines()[0].split()
    assert where.startswith(str(venv)) and implementation == "cython"
    assert reactor == "rdsproxy._fastpath.reactor_c"
    # No system site-packages: what imports there was installed for the wheel.
    assert all(p.startswith(str(venv)) for p in ast.literal_eval(out.stdout.splitlines()[1]))
    help_text = subprocess.run([str(venv / "bin" / "rdsproxy", ), "--help"], capture_output=True,
                               text=True, cwd="/", timeout=60, env=clean_env())
    assert help_text.returncode == 0 and "serve" in help_text.stdout, help_text.stderr


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_installed_wheel_serves_both_engines(venv, engine, request, tmp_path):
    """`rdsproxy serve` from the clean venv relays a real client's query: each engine's
    whole import graph and login path runs there."""
    server = request.getfixturevalue("pg" if engine == "postgres" else "mariadb")
    port = free_port()
    config = proxy_config(tmp_path, server, engine=engine,
                          endpoints=[{"name": "default", "listen": f"127.0.0.1:{port}"}])
    (tmp_path / "proxy.toml").write_text(dump_toml(config))
    with open(tmp_path / "proxy.log", "wb") as log:
        proc = subprocess.Popen([str(venv / "bin" / "rdsproxy"), "serve", "--config",
                                 str(tmp_path / "proxy.toml")],
                                stdout=log, stderr=subprocess.STDOUT, cwd="/", env=clean_env())
    try:
        wait_for_port(port, timeout=30, proc=proc)
        if engine == "postgres":
            with psycopg.connect(libpq_dsn("127.0.0.1", port, APP_USER, APP_PASSWORD,
                                           APP_DB)) as conn:
                assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        else:
            conn = pymysql.connect(host="127.0.0.1", port=port, user=APP_USER,
                                   password=APP_PASSWORD, database=APP_DB, connect_timeout=10)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 40 + 2")
                    assert cur.fetchone() == (42,)
            finally:
                conn.close()
    finally:
        proc.terminate()
        proc.wait(30)
    assert "cython fast path" in (tmp_path / "proxy.log").read_text()


# --- the systemd unit and the container recipe ----------------------------------------------

def read_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str
    unit.read(DEPLOY / "rdsproxy.service")
    return unit


def test_systemd_unit_verifies_and_is_hardened(venv, tmp_path):
    service = read_unit()["Service"]
    assert service["ExecStart"].split()[1:] == ["serve", "--config", "/etc/rdsproxy/proxy.toml"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["User"] not in ("", "root") and service["Restart"] == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "ReadOnlyPaths": "/etc/rdsproxy"}.items():
        assert service[key] == value, key
    assert int(service["LimitNOFILE"]) >= 16384
    # systemd-analyze wants ExecStart to exist: point it at the venv's rdsproxy.
    text = (DEPLOY / "rdsproxy.service").read_text()
    binary = service["ExecStart"].split()[0]
    (tmp_path / "rdsproxy.service").write_text(text.replace(binary, str(venv / "bin" / "rdsproxy")))
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "rdsproxy.service")],
                         capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are warnings with exit status 0: any output fails.
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def test_dockerfile_builds_and_installs_the_wheel_with_the_deploy_scripts():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    stages = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert len(stages) == 2 and stages[1].startswith("python:3.11-slim")
    text = "\n".join(lines)
    assert "deploy/build-wheel.sh /wheels" in text and "install-wheel.sh /wheels/" in text
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert {"6432", "6033"} <= set(next(ln for ln in lines if ln.startswith("EXPOSE ")).split()[1:])
    assert '"serve", "--config", "/etc/rdsproxy/proxy.toml"' in text
    # Everything copied from the context exists and is let through by the dockerignore.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for source in ln.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore, source
