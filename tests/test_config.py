"""Config validation: every error names the file, the key and the problem; defaults;
`rdsproxy validate-config`; `env:` secrets; paths relative to the config file."""
from __future__ import annotations

import copy
import json
import os
import socket
import sys

import psycopg
import pytest

from harness import APP_PASSWORD, APP_USER, RunningProxy
from proxyproc import REPO, dump_toml
from rdsproxy.config import ConfigError, ConfigErrors, config_from_dict, load_config
from rdsproxy.secrets import SecretError, read_secret
from utils import run_cmd

SECRET_CONTENT_PASSWORD = "do-not-print-me-7c1d"

BASE = {
    "name": "cfg-test",
    "engine_family": "POSTGRESQL",
    "target_group": {"max_connections_percent": 20},
    "auth": [{"secret": "file:secrets/app.json"}],
    "targets": [{"host": "127.0.0.1", "port": 5432}],
    "endpoints": [{"name": "default", "listen": "127.0.0.1:6432"}],
}


def write_config(directory, doc, name="proxy.toml", secret=True) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(str(directory), name)
    with open(path, "w") as fh:
        fh.write(dump_toml(doc))
    if secret:
        os.makedirs(os.path.join(str(directory), "secrets"), exist_ok=True)
        with open(os.path.join(str(directory), "secrets", "app.json"), "w") as fh:
            json.dump({"username": "app", "password": SECRET_CONTENT_PASSWORD}, fh)
    return path


def mutated(**changes):
    """BASE with changes; a value of None removes the key; 'section.key' reaches inside
    target_group or the first entry of a list section."""
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        parts = dotted.split("__")
        target = doc
        for part in parts[:-1]:
            target = target[part][0] if isinstance(target[part], list) else target[part]
        if value is None:
            target.pop(parts[-1], None)
        else:
            target[parts[-1]] = value
    return doc


def validate(*args, cwd=None):
    return run_cmd([sys.executable, "-m", "rdsproxy", "validate-config", *args],
                   check=False, cwd=cwd or REPO, timeout=60)


def test_base_config_is_valid(tmp_path):
    path = write_config(tmp_path, BASE)
    cfg = load_config(path)
    assert cfg.name == "cfg-test"
    assert cfg.source == path
    assert cfg.targets[0].port == 5432
    assert cfg.endpoints[0].host == "127.0.0.1" and cfg.endpoints[0].port == 6432


BAD = [
    # (changes, key named in the message, words of the problem)
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"target_group__bogus": 1}, "target_group.bogus", "unknown key"),
    ({"auth__bogus": "x"}, "auth[0].bogus", "unknown key"),
    ({"targets__bogus": "x"}, "targets[0].bogus", "unknown key"),
    ({"endpoints__bogus": "x"}, "endpoints[0].bogus", "unknown key"),
    ({"source": "x"}, "source", "unknown key"),
    ({"target_group__max_connections_percent": "20"}, "target_group.max_connections_percent", "must be int"),
    ({"target_group__max_connections_percent": 12.5}, "target_group.max_connections_percent", "must be int"),
    ({"idle_client_timeout": "soon"}, "idle_client_timeout", "must be float"),
    ({"target_group__max_prepared_statements": -1}, "target_group.max_prepared_statements", "between"),
    ({"require_tls": "yes"}, "require_tls", "must be bool"),
    ({"targets__port": "5432"}, "targets[0].port", "must be int"),
    ({"target_group__session_pinning_filters": "EXCLUDE_VARIABLE_SETS"},
     "target_group.session_pinning_filters", "list of strings"),
    ({"target_group__max_connections_percent": 0}, "target_group.max_connections_percent", "between 1 and 100"),
    ({"target_group__max_connections_percent": 101}, "target_group.max_connections_percent", "between 1 and 100"),
    ({"target_group__max_idle_connections_percent": 30}, "target_group.max_idle_connections_percent",
     "between 0 and 20"),
    ({"target_group__max_idle_connections_percent": -5}, "target_group.max_idle_connections_percent",
     "between 0 and 20"),
    ({"target_group__connection_borrow_timeout": 301}, "target_group.connection_borrow_timeout", "between"),
    ({"idle_client_timeout": -1}, "idle_client_timeout", "positive"),
    ({"login_timeout": 0}, "login_timeout", "between 1 and 600"),
    ({"max_logins_per_address": -1}, "max_logins_per_address", "no cap"),
    ({"stats_log_interval": -1}, "stats_log_interval", "0 (no stats lines)"),
    ({"stats_log_interval": "often"}, "stats_log_interval", "must be float"),
    ({"login_timeout": "soon"}, "login_timeout", "must be float"),
    ({"engine_family": "ORACLE"}, "engine_family", "must be one of POSTGRESQL, MYSQL"),
    ({"auth__client_password_auth_type": "MYSQL_NATIVE_PASSWORD"}, "auth[0].client_password_auth_type",
     "must be one of POSTGRES_SCRAM_SHA_256, POSTGRES_MD5"),
    ({"auth__client_password_auth_type": "plain"}, "auth[0].client_password_auth_type", "must be one of"),
    ({"auth__secret": "vault:app"}, "auth[0].secret", "must start with 'file:' or 'env:'"),
    ({"auth__secret": None}, "auth[0].secret", "is required"),
    ({"target_group__session_pinning_filters": ["EXCLUDE_EVERYTHING"]},
     "target_group.session_pinning_filters", "must be one of EXCLUDE_VARIABLE_SETS"),
    ({"auth": None}, "auth", "at least one [[auth]] entry is required"),
    ({"auth": []}, "auth", "at least one [[auth]] entry is required"),
    ({"targets": None}, "targets", "at least one [[targets]] entry is required"),
    ({"targets__host": None}, "targets[0].host", "is required"),
    ({"targets": [{"host": "127.0.0.1", "port": 5432}, {"host": "127.0.0.1", "port": 5432}]},
     "targets[1]", "duplicate target '127.0.0.1:5432'"),
    ({"target_group__health_check_interval": 0}, "target_group.health_check_interval", "positive"),
    ({"target_group__health_check_failures": 0}, "target_group.health_check_failures", "between 1 and 100"),
    ({"admin": {"listen": "nohost"}}, "admin.listen", "HOST:PORT"),
    ({"targets__port": 70000}, "targets[0].port", "between 1 and 65535"),
    ({"endpoints__listen": "nohost"}, "endpoints[0].listen", "HOST:PORT"),
    ({"endpoints__listen": "127.0.0.1:abc"}, "endpoints[0].listen", "HOST:PORT"),
    ({"endpoints__listen": "127.0.0.1:99999"}, "endpoints[0].listen", ""),
    ({"endpoints__target_role": "ANYTHING"}, "endpoints[0].target_role", "must be one of READ_WRITE, READ_ONLY"),
    ({"endpoints__listen": "no-such-host.invalid:6432"}, "endpoints[0].listen", "cannot resolve host"),
    ({"admin": {"listen": "127.0.0.1:6432"}}, "admin.listen", "is also endpoints[0].listen's address"),
    ({"admin_users": "app"}, "admin_users", "must be a list of strings"),
    ({"admin_users": ["app", 3]}, "admin_users", "must be a list of strings"),
    ({"admin_users": ["app", " "]}, "admin_users[1]", "must be a user name"),
    ({"admin_users": ["app", "app"]}, "admin_users[1]", "duplicate user 'app'"),
]


@pytest.mark.parametrize("changes,key,problem", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_config_names_file_key_problem(tmp_path, changes, key, problem):
    path = write_config(tmp_path, mutated(**changes))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.source == path
    assert err.key == key
    assert problem in err.problem
    assert str(err) == f"{path}: {key}: {err.problem}"
    # The CLI says the same and fails.
    res = validate(path)
    assert res.returncode != 0
    assert f"{path}: {key}: " in res.stderr
    assert problem in res.stderr


def test_every_problem_is_reported_at_once(tmp_path):
    doc = mutated(bogus=1, target_group__max_connections_percent=0, targets__port=70000)
    doc["endpoints"].append({"name": "other", "listen": "0.0.0.0:6432"})   # overlaps the first
    path = write_config(tmp_path, doc)
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    expected = [("bogus", "unknown key"),
                ("target_group.max_connections_percent", "must be between 1 and 100"),
                ("targets[0].port", "must be between 1 and 65535"),
                ("endpoints[1].listen", "0.0.0.0:6432 is also endpoints[0].listen's address")]
    assert [(p.key, p.problem[:len(text)]) for p, (_, text) in zip(info.value.problems, expected)] \
        == expected
    assert len(info.value.problems) == len(expected)
    for res in (validate(path), validate("--config", path)):
        assert res.returncode != 0
        lines = [line.removeprefix("Error: ") for line in res.stderr.strip().splitlines()]
        assert lines == [str(p) for p in info.value.problems]


def test_every_unreadable_secret_is_reported_with_its_key(tmp_path):
    doc = mutated()
    doc["auth"] = [{"secret": "file:secrets/missing-1.json"}, {"secret": "file:secrets/app.json"},
                   {"secret": "file:secrets/missing-2.json"}]
    path = write_config(tmp_path, doc)
    res = validate("--config", path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"Error: {path}: auth[0].secret: ") and "missing-1.json" in lines[0]
    assert lines[1].startswith(f"{path}: auth[2].secret: ") and "missing-2.json" in lines[1]


def test_serve_names_the_endpoint_whose_address_is_taken(tmp_path, pg):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        doc = mutated(targets__port=pg.port, endpoints__listen=f"127.0.0.1:{port}")
        path = write_config(tmp_path, doc)
        res = run_cmd([sys.executable, "-m", "rdsproxy", "serve", "--config", path],
                      check=False, cwd=REPO, timeout=60)
    finally:
        taken.close()
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert f"Error: endpoint default cannot listen on 127.0.0.1:{port}: Address already in use" \
        in res.stderr.splitlines()


def test_serve_names_the_file_and_key_of_an_unreadable_secret(tmp_path, pg):
    doc = mutated(targets__port=pg.port, auth__secret="file:secrets/missing.json",
                  endpoints__listen="127.0.0.1:0")
    path = write_config(tmp_path, doc)
    res = run_cmd([sys.executable, "-m", "rdsproxy", "serve", "--config", path],
                  check=False, cwd=REPO, timeout=60)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, res.stderr
    assert errors[0].startswith(f"Error: {path}: auth[0].secret: ") and "missing.json" in errors[0]


def test_duplicate_endpoint_names(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["endpoints"].append({"name": "default", "listen": "127.0.0.1:6433"})
    path = write_config(tmp_path, doc)
    with pytest.raises(ConfigError, match=r"endpoints\[1\]\.name: duplicate endpoint name"):
        load_config(path)


def test_not_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n[[[")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "not valid TOML" in str(info.value)
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="file not found"):
        load_config(missing)
    res = validate(str(missing))
    assert res.returncode != 0 and f"Error: {missing}: file not found" in res.stderr


def test_defaults(tmp_path):
    doc = mutated(target_group=None, endpoints=None, name=None, engine_family=None)
    cfg = load_config(write_config(tmp_path, doc))
    tg = cfg.target_group
    assert tg.max_connections_percent == 100
    assert tg.max_idle_connections_percent == 50
    assert tg.connection_borrow_timeout == 120
    assert tg.session_pinning_filters == []
    assert cfg.engine_family == "POSTGRESQL"
    assert cfg.idle_client_timeout == 1800
    assert cfg.auth[0].client_password_auth_type == "POSTGRES_SCRAM_SHA_256"
    assert [(e.name, e.listen) for e in cfg.endpoints] == [("default", "127.0.0.1:6432")]
    # max_idle_connections_percent defaults to half of max_connections_percent.
    for percent, idle in ((20, 10), (15, 7), (1, 0), (100, 50)):
        cfg = config_from_dict(mutated(target_group={"max_connections_percent": percent}))
        assert cfg.target_group.max_idle_connections_percent == idle
    cfg = config_from_dict(mutated(target_group={"max_connections_percent": 40,
                                                 "max_idle_connections_percent": 0}))
    assert cfg.target_group.max_idle_connections_percent == 0


def test_validate_config_cli_ok(tmp_path):
    path = write_config(tmp_path, BASE)
    res = validate(path)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    assert SECRET_CONTENT_PASSWORD not in res.stdout + res.stderr


@pytest.mark.parametrize("content,problem", [
    (None, "cannot read file"),
    ("{not json " + SECRET_CONTENT_PASSWORD, "not valid JSON"),
    (json.dumps({"user": "app", "password": SECRET_CONTENT_PASSWORD}), "username"),
    (json.dumps({"username": "app", "password": SECRET_CONTENT_PASSWORD, "port": "x" + SECRET_CONTENT_PASSWORD}),
     "'port' is not a number"),
])
def test_validate_config_cli_bad_secret(tmp_path, content, problem):
    doc = mutated(auth__secret="file:secrets/broken.json")
    path = write_config(tmp_path, doc)
    if content is not None:
        (tmp_path / "secrets" / "broken.json").write_text(content)
    res = validate(path)
    assert res.returncode != 0
    assert "file:secrets/broken.json" in res.stderr
    assert problem in res.stderr
    assert SECRET_CONTENT_PASSWORD not in res.stdout + res.stderr
    with pytest.raises(SecretError) as info:
        read_secret("file:secrets/broken.json", str(tmp_path))
    assert SECRET_CONTENT_PASSWORD not in str(info.value)


def test_secret_that_is_a_directory(tmp_path):
    doc = mutated(auth__secret="file:secrets")
    path = write_config(tmp_path, doc)
    res = validate(path)
    assert res.returncode != 0
    assert "file:secrets" in res.stderr and "cannot read file" in res.stderr


def test_env_secrets(tmp_path, monkeypatch):
    var = "RDSPROXY_TEST_SECRET_CFG"
    doc = mutated(auth__secret=f"env:{var}")
    path = write_config(tmp_path, doc, secret=False)
    monkeypatch.delenv(var, raising=False)
    res = validate(path)
    assert res.returncode != 0
    assert f"env:{var}" in res.stderr and "not set" in res.stderr
    monkeypatch.setenv(var, json.dumps({"username": "envuser", "password": SECRET_CONTENT_PASSWORD}))
    res = validate(path)
    assert res.returncode == 0, res.stderr
    creds = read_secret(f"env:{var}")
    assert creds.username == "envuser" and creds.password == SECRET_CONTENT_PASSWORD
    assert SECRET_CONTENT_PASSWORD not in repr(creds)
    monkeypatch.setenv(var, "not json " + SECRET_CONTENT_PASSWORD)
    res = validate(path)
    assert res.returncode != 0 and "not valid JSON" in res.stderr
    assert SECRET_CONTENT_PASSWORD not in res.stderr


def test_env_secret_serves_clients(pg, monkeypatch):
    var = "RDSPROXY_TEST_SECRET_SERVE"
    monkeypatch.setenv(var, json.dumps({"username": APP_USER, "password": APP_PASSWORD}))
    cfg = config_from_dict({
        "auth": [{"secret": f"env:{var}"}],
        "target_group": {"max_connections_percent": 10},
        "targets": [{"host": pg.host, "port": pg.port}],
        "endpoints": [{"name": "default", "listen": "127.0.0.1:0"}],
    })
    running = RunningProxy(cfg)
    try:
        with psycopg.connect(running.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
    finally:
        running.stop()


def test_paths_relative_to_config_file(tmp_path):
    confdir = tmp_path / "etc" / "conf"
    path = write_config(confdir, BASE)
    cfg = load_config(path)
    assert os.path.samefile(cfg.base_dir, confdir)
    assert os.path.samefile(cfg.resolve_path("secrets/app.json"), confdir / "secrets" / "app.json")
    assert cfg.resolve_path("/abs/x.json") == "/abs/x.json"
    # validate-config from an unrelated working directory, with a relative config path too.
    res = validate(path, cwd="/")
    assert res.returncode == 0, res.stderr
    res = validate(os.path.join("conf", "proxy.toml"), cwd=str(tmp_path / "etc"))
    assert res.returncode == 0, res.stderr
    # The same relative secret is not found next to a config elsewhere.
    other = write_config(tmp_path / "elsewhere", BASE, secret=False)
    res = validate(other)
    assert res.returncode != 0 and "cannot read file" in res.stderr
    # An absolute secret path works from anywhere.
    abs_doc = mutated(auth__secret=f"file:{confdir / 'secrets' / 'app.json'}")
    res = validate(write_config(tmp_path / "abs", abs_doc, secret=False))
    assert res.returncode == 0, res.stderr
