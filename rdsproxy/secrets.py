"""Secret references (`file:`, `env:`, `aws-secretsmanager:`) read as credentials, plus a refreshing cache."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import orjson

__all__ = ["Credentials", "SecretError", "SecretProvider", "PROVIDERS", "read_secret",
           "read_secret_document", "read_principal_secret", "SecretCache"]

log = logging.getLogger("rdsproxy.secrets")


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


# -- providers ----------------------------------------------------------------------------

class SecretProvider(Protocol):
    """Fetches the raw bytes behind `<kind>:<where>`; raises SecretError naming `reference`."""

    def read(self, where: str, reference: str, base_dir: str) -> bytes: ...


class FileProvider:
    """`file:PATH` — a JSON file; relative paths are taken from the config file's directory."""

    def read(self, where: str, reference: str, base_dir: str) -> bytes:
        path = where if os.path.isabs(where) else os.path.join(base_dir, where)
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise SecretError(f"secret {reference!r}: cannot read file ({exc.strerror})") from None


class EnvProvider:
    """`env:NAME` — JSON in an environment variable."""

    def read(self, where: str, reference: str, base_dir: str) -> bytes:
        value = os.environ.get(where)
        if value is None:
            raise SecretError(f"secret {reference!r}: environment variable {where} is not set")
        return value.encode()


class AwsSecretsManagerProvider:
    """`aws-secretsmanager:ARN-or-name` — GetSecretValue with boto3 (optional; imported on first use).

    Endpoint, region and credentials come from boto3's usual sources, e.g.
    AWS_ENDPOINT_URL_SECRETS_MANAGER / AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID.
    For an ARN the region is taken from the ARN. This call blocks: from the event loop use
    `SecretCache.aget` (or run `read_secret` in a thread).
    """

    _ENV_KEYS = ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")

    def __init__(self) -> None:
        self._clients: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def _client(self, region: str | None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise SecretError("aws-secretsmanager: secrets need boto3, which is not installed") from None
        # Keyed on the environment as well, so a changed endpoint or identity takes effect.
        key = (region,) + tuple(os.environ.get(k) for k in self._ENV_KEYS)
        with self._lock:  # boto3 session/client creation is not thread-safe
            client = self._clients.get(key)
            if client is None:
                config = Config(connect_timeout=5, read_timeout=10,
                                retries={"max_attempts": 3, "mode": "standard"})
                client = boto3.session.Session().client("secretsmanager", region_name=region,
                                                        config=config)
                self._clients[key] = client
            return client

    def read(self, where: str, reference: str, base_dir: str) -> bytes:
        if not where:
            raise SecretError(f"secret {reference!r}: no secret name or ARN after 'aws-secretsmanager:'")
        region = None
        if where.startswith("arn:"):
            parts = where.split(":")
            if len(parts) < 7 or parts[2] != "secretsmanager" or not parts[3]:
                raise SecretError(f"secret {reference!r}: not a Secrets Manager ARN")
            region = parts[3]
        client = self._client(region)
        try:
            from botocore.exceptions import BotoCoreError, ClientError
            response = client.get_secret_value(SecretId=where)
        except ClientError as exc:
            # Only the error code: AWS messages can echo request details.
            code = exc.response.get("Error", {}).get("Code", "error")
            raise SecretError(f"secret {reference!r}: Secrets Manager refused ({code})") from None
        except BotoCoreError as exc:
            raise SecretError(f"secret {reference!r}: Secrets Manager unreachable or not "
                              f"configured ({type(exc).__name__})") from None
        if response.get("SecretString") is not None:
            return response["SecretString"].encode()
        if response.get("SecretBinary") is not None:
            return bytes(response["SecretBinary"])
        raise SecretError(f"secret {reference!r}: secret has no value")


PROVIDERS: dict[str, SecretProvider] = {
    "file": FileProvider(),
    "env": EnvProvider(),
    "aws-secretsmanager": AwsSecretsManagerProvider(),
}


def _read_raw(reference: str, base_dir: str) -> bytes:
    kind, _, where = reference.partition(":")
    provider = PROVIDERS.get(kind)
    if provider is None:
        raise SecretError(f"secret {reference!r}: unknown provider {kind!r} "
                          f"(use file:, env: or aws-secretsmanager:)")
    return provider.read(where, reference, base_dir)


def _load_json(reference: str, base_dir: str) -> Any:
    try:
        return orjson.loads(_read_raw(reference, base_dir))
    except orjson.JSONDecodeError:
        raise SecretError(f"secret {reference!r}: not valid JSON") from None


def read_secret_document(reference: str, base_dir: str = ".") -> dict:
    """The secret's JSON object; SecretError (naming only the reference) if unreadable or not an object."""
    doc = _load_json(reference, base_dir)
    if not isinstance(doc, dict):
        raise SecretError(f"secret {reference!r}: not a JSON object")
    return doc


# -- parsers ------------------------------------------------------------------------------

def read_secret(reference: str, base_dir: str = ".") -> Credentials:
    """Database credentials from a secret in the RDS shape {"username", "password", ...}."""
    doc = _load_json(reference, base_dir)
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


def read_principal_secret(reference: str, base_dir: str = ".") -> tuple[str, str]:
    """An IAM key pair from a secret {"AccessKeyId": ..., "SecretAccessKey": ...}."""
    doc = read_secret_document(reference, base_dir)
    akid, secret = doc.get("AccessKeyId"), doc.get("SecretAccessKey")
    if not isinstance(akid, str) or not akid or not isinstance(secret, str) or not secret:
        raise SecretError(f"secret {reference!r}: needs non-empty string fields "
                          f"'AccessKeyId' and 'SecretAccessKey'")
    return akid, secret


# -- cache --------------------------------------------------------------------------------

class SecretCache:
    """Credentials by reference, read once and re-read on demand or periodically.

    A failed re-read keeps the previous value (a rotation in progress or a network blip must
    not lock everyone out) and is logged with the reference and a content-free reason.
    """

    def __init__(self, base_dir: str = ".", refresh_interval: float = 300.0,
                 reader: Callable[[str, str], Credentials] = read_secret):
        self.base_dir = base_dir
        self.refresh_interval = refresh_interval
        self._reader = reader
        self._values: dict[str, Credentials] = {}
        self._lock = threading.Lock()  # refresh_all may run in a worker thread

    def __contains__(self, reference: str) -> bool:
        return reference in self._values

    def references(self) -> list[str]:
        with self._lock:
            return list(self._values)

    def get(self, reference: str) -> Credentials:
        """Cached credentials; reads (blocking) on first use. Raises SecretError."""
        value = self._values.get(reference)
        if value is None:
            value = self._reader(reference, self.base_dir)
            with self._lock:
                value = self._values.setdefault(reference, value)
        return value

    async def aget(self, reference: str) -> Credentials:
        """Like get(), but a first read happens in a worker thread (AWS calls must not block the loop)."""
        value = self._values.get(reference)
        if value is not None:
            return value
        return await asyncio.to_thread(self.get, reference)

    def invalidate(self, reference: str) -> None:
        with self._lock:
            self._values.pop(reference, None)

    def refresh_all(self) -> list[str]:
        """Re-read every cached reference (blocking); return those whose credentials changed."""
        changed = []
        for reference in self.references():
            try:
                value = self._reader(reference, self.base_dir)
            except SecretError as exc:   # its text names the reference, never the content
                log.warning("%s; keeping the previous value", exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a refresher must survive anything
                log.warning("secret %r: refresh failed (%s); keeping the previous value",
                            reference, type(exc).__name__)
                continue
            with self._lock:
                old = self._values.get(reference)
                if old is None:          # invalidated meanwhile: do not resurrect it
                    continue
                if value != old:
                    self._values[reference] = value
                    changed.append(reference)
        if changed:
            log.info("secrets changed: %s", ", ".join(changed))
        return changed

    async def arefresh_all(self) -> list[str]:
        return await asyncio.to_thread(self.refresh_all)

    async def run(self, loop_interval: float | None = None,
                  on_change: Callable[[list[str]], Any] | None = None) -> None:
        """Refresh forever every `loop_interval` (default refresh_interval) seconds; cancel to stop.

        `on_change(references)` is called on the event loop after a refresh that changed
        something (it may be a coroutine function).
        """
        interval = self.refresh_interval if loop_interval is None else loop_interval
        while True:
            await asyncio.sleep(interval)
            changed = await self.arefresh_all()
            if changed and on_change is not None:
                try:
                    result = on_change(changed)
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:  # noqa: BLE001 - keep refreshing
                    log.exception("secret change handler failed")
