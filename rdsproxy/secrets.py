"""Secret references (`file:`, `env:`) resolved to credentials in the Secrets Manager JSON shape."""
from __future__ import annotations

import os
from dataclasses import dataclass

import orjson


class SecretError(Exception):
    """A secret that cannot be read or parsed; names the reference, never the content."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    engine: str = ""
    host: str = ""
    port: int = 0
    dbname: str = ""

    def __repr__(self) -> str:  # keep passwords out of logs and tracebacks
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def read_secret(reference: str, base_dir: str = ".") -> Credentials:
    kind, _, where = reference.partition(":")
    if kind == "file":
        path = where if os.path.isabs(where) else os.path.join(base_dir, where)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise SecretError(f"secret {reference!r}: cannot read file ({exc.strerror})") from None
    elif kind == "env":
        value = os.environ.get(where)
        if value is None:
            raise SecretError(f"secret {reference!r}: environment variable {where} is not set")
        raw = value.encode()
    else:
        raise SecretError(f"secret {reference!r}: unknown provider {kind!r} (use file: or env:)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise SecretError(f"secret {reference!r}: not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("username"), str) \
            or not isinstance(doc.get("password"), str):
        raise SecretError(f"secret {reference!r}: needs string fields 'username' and 'password'")
    port = doc.get("port") or 0
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise SecretError(f"secret {reference!r}: 'port' is not a number") from None
    return Credentials(username=doc["username"], password=doc["password"],
                       engine=str(doc.get("engine") or ""), host=str(doc.get("host") or ""),
                       port=port, dbname=str(doc.get("dbname") or ""))
