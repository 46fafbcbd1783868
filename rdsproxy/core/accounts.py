"""Who may log in: accounts built from the secrets, IAM principals, and their refresh."""
from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager

from ..auth.iam import Principal
from ..secrets import SecretCache, SecretError, read_principal_secret, read_secret

log = logging.getLogger("rdsproxy.engine")


@contextmanager
def _naming(source: str, key: str):
    """A SecretError raised inside, prefixed with the config file and key that named it."""
    try:
        yield
    except SecretError as exc:
        raise SecretError(f"{source}: {key}: {exc}") from None


class AccountRegistry:
    """The accounts by user name (each engine's own login material, made by `make_account`)
    and the IAM principals by access key id, read through secret caches so that AWS reads
    happen off the loop and a failed re-read keeps the last good value. `on_change` runs
    after every rebuild (a start, a refresh, a rotation)."""

    def __init__(self, config, loop, make_account, on_change=None):
        self.config = config
        self.loop = loop
        self.make_account = make_account
        self.on_change = on_change
        self.by_user: dict = {}
        self.principals: dict[str, Principal] = {}
        self.iam_region = (config.iam.region or None) if config.iam is not None else None
        self._errors: list[Exception] = []   # from the latest refresh
        self._refreshing = None
        self.secrets = SecretCache(config.base_dir, config.secrets_refresh_interval,
                                   reader=self._recording(read_secret))
        self.principal_secrets = SecretCache(config.base_dir, config.secrets_refresh_interval,
                                             reader=self._recording(read_principal_secret))

    # Lookups read like a dict of accounts.
    def get(self, user):
        return self.by_user.get(user)

    def __contains__(self, user) -> bool:
        return user in self.by_user

    def values(self):
        return self.by_user.values()

    def _recording(self, reader):
        # The cache keeps the old value on a failed re-read; remember why, so SIGHUP can say so.
        def read(reference, base_dir):
            try:
                return reader(reference, base_dir)
            except Exception as exc:
                self._errors.append(exc)
                raise
        return read

    def _build(self) -> None:
        """Accounts from the cached secrets (every reference must be in the cache)."""
        accounts = {}
        for entry in self.config.auth:
            creds = self.secrets.get(entry.secret)
            accounts[creds.username] = self.make_account(creds, entry,
                                                         self.by_user.get(creds.username))
        principals = {}
        if self.config.iam is not None:
            for i, entry in enumerate(self.config.iam.principals):
                akid, secret_key = self.principal_secrets.get(entry.secret_access_key)
                if entry.access_key_id and entry.access_key_id != akid:
                    raise SecretError(f"{self.config.source}: iam.principals[{i}]: secret "
                                      f"{entry.secret_access_key!r} holds another AccessKeyId than "
                                      f"access_key_id {entry.access_key_id!r}")
                principals[akid] = Principal(akid, secret_key, tuple(entry.resources))
        self.by_user = accounts
        self.principals = principals
        if self.on_change is not None:
            self.on_change()

    async def load(self) -> None:
        """First read of every secret, in worker threads (AWS calls must not block the loop)."""
        config = self.config
        for i, entry in enumerate(config.auth):
            with _naming(config.source, f"auth[{i}].secret"):
                await self.secrets.aget(entry.secret)
        if config.iam is not None:
            for i, entry in enumerate(config.iam.principals):
                with _naming(config.source, f"iam.principals[{i}].secret_access_key"):
                    await asyncio.to_thread(self.principal_secrets.get, entry.secret_access_key)
        self._build()

    async def refresh(self) -> list[str]:
        """Re-read every secret (off the loop); rebuild the accounts if any changed.

        Concurrent callers (many logins failing at once after a rotation) share one refresh.
        """
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self.loop.create_task(self._refresh())
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> list[str]:
        self._errors = []
        changed = await self.secrets.arefresh_all()
        changed += await self.principal_secrets.arefresh_all()
        if changed:
            self._build()
            log.info("credentials updated from %d changed secret(s); new logins and new database "
                     "connections use them, open sessions continue", len(changed))
        return changed

    async def reload(self) -> None:
        """SIGHUP: read the secrets again; a failure keeps what is in use."""
        try:
            await self.refresh()
            if self._errors:
                raise self._errors[0]
            log.info("secrets reloaded")
        except SecretError as exc:
            log.error("secrets not reloaded: %s (keeping the previous value)", exc)
        except Exception as exc:  # noqa: BLE001 - a reload must never stop the proxy
            log.error("secrets not reloaded: %s (keeping the previous value)", type(exc).__name__)

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.secrets_refresh_interval)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep refreshing
                log.exception("secret refresh failed")

    async def retry_with_fresh_secret(self, account, attempt, refused):
        """`await attempt(account)`; if the database refuses the password (`refused(exc)`),
        the secret may have been rotated since we read it: read it again and, if the
        password changed, try once more with it (rather than wait for the next refresh)."""
        try:
            return await attempt(account)
        except Exception as exc:
            if not refused(exc):
                raise
            user = account.credentials.username
            try:
                await self.refresh()
            except SecretError as err:
                log.warning("secret refresh after a refused database login: %s", err)
            fresh = self.by_user.get(user)
            if fresh is None or fresh.credentials.password == account.credentials.password:
                raise
            log.info("database login for %r failed with the cached password; retrying with the "
                     "refreshed secret", user)
            return await attempt(fresh)

    def probe_account(self):
        """Health checks log in as the first configured account."""
        creds = self.secrets.get(self.config.auth[0].secret)
        return self.by_user.get(creds.username)
