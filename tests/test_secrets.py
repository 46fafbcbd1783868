"""Secret providers (file, env, AWS Secrets Manager via a local moto server) and SecretCache."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading

import pytest

from rdsproxy.secrets import (
    Credentials,
    SecretCache,
    SecretError,
    read_principal_secret,
    read_secret,
    read_secret_document,
)

CONTENT = "s3cr3t-Content-Never-Logged"


def write(path, doc):
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def no_content(exc_info):
    assert CONTENT not in str(exc_info.value)
    assert exc_info.value.__cause__ is None or CONTENT not in str(exc_info.value.__cause__)


# -- file: and env: -----------------------------------------------------------------------

def test_file_secret_relative_and_absolute(tmp_path):
    write(tmp_path / "s.json", {"username": "app", "password": CONTENT, "port": "5432",
                                "engine": "postgres", "host": "db", "dbname": "appdb"})
    creds = read_secret("file:s.json", str(tmp_path))
    assert creds == Credentials("app", CONTENT, "postgres", "db", 5432, "appdb")
    assert read_secret(f"file:{tmp_path / 's.json'}", "/nonexistent") == creds
    assert CONTENT not in repr(creds)


@pytest.mark.parametrize("content,problem", [
    (None, "cannot read file"),
    ("not json " + CONTENT, "not valid JSON"),
    (json.dumps([CONTENT]), "needs string fields"),
    (json.dumps({"username": "app"}), "needs string fields"),
    (json.dumps({"username": 1, "password": CONTENT}), "needs string fields"),
    (json.dumps({"username": "app", "password": CONTENT, "port": "x" + CONTENT}), "'port' is not a number"),
])
def test_file_secret_errors_name_reference_not_content(tmp_path, content, problem):
    if content is not None:
        write(tmp_path / "bad.json", content)
    with pytest.raises(SecretError, match=problem) as info:
        read_secret("file:bad.json", str(tmp_path))
    assert "file:bad.json" in str(info.value)
    no_content(info)


def test_env_secret(monkeypatch):
    monkeypatch.setenv("RDSPROXY_T_SECRET", json.dumps({"username": "u", "password": CONTENT}))
    assert read_secret("env:RDSPROXY_T_SECRET").password == CONTENT
    monkeypatch.delenv("RDSPROXY_T_SECRET")
    with pytest.raises(SecretError, match="not set"):
        read_secret("env:RDSPROXY_T_SECRET")
    monkeypatch.setenv("RDSPROXY_T_SECRET", CONTENT)
    with pytest.raises(SecretError, match="not valid JSON") as info:
        read_secret("env:RDSPROXY_T_SECRET")
    no_content(info)


def test_unknown_provider():
    with pytest.raises(SecretError, match="unknown provider 'vault'"):
        read_secret("vault:x")
    with pytest.raises(SecretError, match="unknown provider"):
        read_secret("no-colon-at-all")


def test_principal_secret(tmp_path):
    write(tmp_path / "p.json", {"AccessKeyId": "AKIAEXAMPLE", "SecretAccessKey": CONTENT})
    assert read_principal_secret("file:p.json", str(tmp_path)) == ("AKIAEXAMPLE", CONTENT)
    for bad in ({"AccessKeyId": "AKIAEXAMPLE"}, {"AccessKeyId": "", "SecretAccessKey": CONTENT},
                {"AccessKeyId": 5, "SecretAccessKey": CONTENT}, [CONTENT], "x" + CONTENT):
        write(tmp_path / "p.json", json.dumps(bad) if not isinstance(bad, str) else bad)
        with pytest.raises(SecretError, match="file:p.json") as info:
            read_principal_secret("file:p.json", str(tmp_path))
        no_content(info)


def test_secret_document(tmp_path):
    write(tmp_path / "d.json", {"a": 1})
    assert read_secret_document("file:d.json", str(tmp_path)) == {"a": 1}
    write(tmp_path / "d.json", "[1]")
    with pytest.raises(SecretError, match="not a JSON object"):
        read_secret_document("file:d.json", str(tmp_path))


# -- SecretCache (file-backed) ------------------------------------------------------------

def test_cache_get_refresh_and_failure_keeps_old_value(tmp_path, caplog):
    path = write(tmp_path / "s.json", {"username": "app", "password": "one"})
    cache = SecretCache(str(tmp_path))
    assert cache.get("file:s.json").password == "one"
    write(path, {"username": "app", "password": "two"})
    assert cache.get("file:s.json").password == "one"       # cached
    assert cache.refresh_all() == ["file:s.json"]
    assert cache.get("file:s.json").password == "two"
    assert cache.refresh_all() == []                        # nothing changed since

    write(path, "{broken " + CONTENT)
    with caplog.at_level(logging.WARNING, logger="rdsproxy.secrets"):
        assert cache.refresh_all() == []
    assert cache.get("file:s.json").password == "two"
    assert "file:s.json" in caplog.text and CONTENT not in caplog.text
    path.unlink()
    assert cache.refresh_all() == []
    assert cache.get("file:s.json").password == "two"


def test_cache_first_read_error_propagates_and_is_not_cached(tmp_path):
    cache = SecretCache(str(tmp_path))
    with pytest.raises(SecretError):
        cache.get("file:missing.json")
    assert "file:missing.json" not in cache
    write(tmp_path / "missing.json", {"username": "u", "password": "p"})
    assert cache.get("file:missing.json").username == "u"


def test_cache_reader_crash_keeps_old_value(caplog):
    values = iter([Credentials("u", "p1")])

    def reader(reference, base_dir):
        try:
            return next(values)
        except StopIteration:
            raise RuntimeError(CONTENT) from None

    cache = SecretCache(reader=reader)
    assert cache.get("x:y").password == "p1"
    with caplog.at_level(logging.WARNING, logger="rdsproxy.secrets"):
        assert cache.refresh_all() == []
    assert cache.get("x:y").password == "p1"
    assert "x:y" in caplog.text and CONTENT not in caplog.text


def test_cache_invalidate(tmp_path):
    write(tmp_path / "s.json", {"username": "app", "password": "one"})
    cache = SecretCache(str(tmp_path))
    cache.get("file:s.json")
    cache.invalidate("file:s.json")
    assert cache.references() == []
    assert cache.refresh_all() == []


def test_aget_reads_in_a_worker_thread():
    threads = []

    def reader(reference, base_dir):
        threads.append(threading.get_ident())
        return Credentials("u", reference)

    cache = SecretCache(reader=reader)

    async def main():
        first = await cache.aget("a:1")
        again = await cache.aget("a:1")
        return first, again

    first, again = asyncio.run(main())
    assert first is again and first.password == "a:1"
    assert threads and threads[0] != threading.get_ident() and len(threads) == 1


def test_run_refreshes_and_reports(tmp_path):
    path = write(tmp_path / "s.json", {"username": "app", "password": "one"})
    cache = SecretCache(str(tmp_path), refresh_interval=0.01)
    cache.get("file:s.json")
    seen = []

    async def main():
        got = asyncio.Event()

        async def on_change(refs):
            seen.append(refs)
            got.set()

        task = asyncio.create_task(cache.run(on_change=on_change))
        await asyncio.sleep(0.05)
        write(path, {"username": "app", "password": "two"})
        await asyncio.wait_for(got.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == [["file:s.json"]]
    assert cache.get("file:s.json").password == "two"


# -- aws-secretsmanager: against a local moto server --------------------------------------

def test_aws_read_by_name_and_arn(secretsmanager):
    arn = secretsmanager.create_secret(Name="rdsproxy/app", SecretString=json.dumps(
        {"username": "app", "password": "first", "engine": "postgres", "port": 5432}))["ARN"]
    by_name = read_secret("aws-secretsmanager:rdsproxy/app")
    assert by_name == Credentials("app", "first", "postgres", "", 5432, "")
    assert read_secret(f"aws-secretsmanager:{arn}") == by_name


def test_aws_rotation_seen_by_refresh_all(secretsmanager):
    secretsmanager.create_secret(Name="rotating", SecretString=json.dumps({"username": "app", "password": "v1"}))
    ref = "aws-secretsmanager:rotating"
    cache = SecretCache()
    assert cache.get(ref).password == "v1"
    assert cache.refresh_all() == []
    secretsmanager.put_secret_value(SecretId="rotating",
                             SecretString=json.dumps({"username": "app", "password": "v2"}))
    assert cache.get(ref).password == "v1"
    assert cache.refresh_all() == [ref]
    assert cache.get(ref).password == "v2"

    # Secret gone: the cache keeps serving the last good value.
    secretsmanager.delete_secret(SecretId="rotating", ForceDeleteWithoutRecovery=True)
    assert cache.refresh_all() == []
    assert cache.get(ref).password == "v2"


def test_aws_aget_and_async_refresh(secretsmanager):
    secretsmanager.create_secret(Name="async-one", SecretString=json.dumps({"username": "a", "password": "x1"}))
    cache = SecretCache()

    async def main():
        first = await cache.aget("aws-secretsmanager:async-one")
        secretsmanager.put_secret_value(SecretId="async-one",
                                 SecretString=json.dumps({"username": "a", "password": "x2"}))
        changed = await cache.arefresh_all()
        return first, changed

    first, changed = asyncio.run(main())
    assert first.password == "x1" and changed == ["aws-secretsmanager:async-one"]


def test_aws_errors_name_reference_only(secretsmanager):
    with pytest.raises(SecretError, match="ResourceNotFoundException") as info:
        read_secret("aws-secretsmanager:does-not-exist")
    assert "aws-secretsmanager:does-not-exist" in str(info.value)

    secretsmanager.create_secret(Name="garbage", SecretString="oops " + CONTENT)
    with pytest.raises(SecretError, match="not valid JSON") as info:
        read_secret("aws-secretsmanager:garbage")
    no_content(info)

    with pytest.raises(SecretError, match="not a Secrets Manager ARN"):
        read_secret("aws-secretsmanager:arn:aws:s3:::bucket")
    with pytest.raises(SecretError, match="no secret name"):
        read_secret("aws-secretsmanager:")


def test_aws_binary_secret(secretsmanager):
    secretsmanager.create_secret(Name="binary", SecretBinary=json.dumps({"username": "b", "password": "p"}).encode())
    assert read_secret("aws-secretsmanager:binary").username == "b"


def test_aws_principal_secret(secretsmanager):
    secretsmanager.create_secret(Name="iam-key", SecretString=json.dumps(
        {"AccessKeyId": "AKIAEXAMPLE", "SecretAccessKey": CONTENT}))
    assert read_principal_secret("aws-secretsmanager:iam-key", ".") == ("AKIAEXAMPLE", CONTENT)


def test_aws_endpoint_unreachable(secretsmanager, monkeypatch):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SecretError, match="unreachable") as info:
        read_secret("aws-secretsmanager:anything")
    assert "aws-secretsmanager:anything" in str(info.value)


def test_aws_without_boto3(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)   # makes `import boto3` fail
    with pytest.raises(SecretError, match="boto3"):
        read_secret("aws-secretsmanager:x")
