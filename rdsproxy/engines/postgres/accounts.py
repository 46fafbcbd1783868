"""Who may log in, and how: accounts, the exchange each logs in with, and the decoys that
take users who cannot log in through the same exchange to the same failure."""
from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from dataclasses import dataclass

from ...auth.scram import ScramSecret, decoy_server_key_material
from ...secrets import Credentials

# How a client proves who it is: the two client_password_auth_types, and a cleartext
# password over TLS (an IAM token, or with iam_auth OPTIONAL the password).
SCRAM, MD5, CLEARTEXT = "POSTGRES_SCRAM_SHA_256", "POSTGRES_MD5", "CLEARTEXT"
METHOD_PREFERENCE = (SCRAM, MD5, CLEARTEXT)   # a tie between methods goes to the first


@dataclass
class Account:
    credentials: Credentials
    client_auth: str
    scram_secret: ScramSecret
    iam_auth: str = "DISABLED"
    reference: str = ""
    decoy: bool = False   # a stand-in for a user who cannot log in: nothing passes it


def login_method(account: Account, tls: bool) -> str | None:
    """The exchange `account` logs in with over TLS or plaintext; None: it cannot log in
    that way (IAM-only over plaintext)."""
    if account.iam_auth != "DISABLED":
        if tls:
            return CLEARTEXT
        if account.iam_auth == "REQUIRED":
            return None
    return account.client_auth


def default_method(accounts, tls: bool) -> str:
    """The exchange users who cannot log in get: the one most accounts log in with over
    that transport, so that such a user looks like one of them (a tie goes to SCRAM, then
    md5; SCRAM when no account logs in that way)."""
    used = Counter(login_method(account, tls) for account in accounts)
    return max(METHOD_PREFERENCE, key=lambda method: (used[method], -METHOD_PREFERENCE.index(method)))


def decoy_account(key: bytes, user: str, method: str) -> Account:
    """Stand-in credentials for `user` logging in with `method`: the same at every attempt
    (scram.decoy_server_key_material), made from `key`, which never leaves the process,
    so no password matches them."""
    name = user.encode("utf-8", "surrogatepass")
    password = hmac.new(key, b"password\x00" + name, hashlib.sha256).hexdigest()
    return Account(Credentials(user, password), SCRAM if method == CLEARTEXT else method,
                   decoy_server_key_material(key, user),
                   iam_auth="REQUIRED" if method == CLEARTEXT else "DISABLED", decoy=True)
