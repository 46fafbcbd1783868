"""Password authentication mechanisms (SCRAM-SHA-256 and md5), both server and client side."""
from .md5 import md5_password_hash, md5_response, md5_verify
from .scram import (
    ScramClient,
    ScramError,
    ScramSecret,
    ScramServer,
    make_server_key_material,
)

__all__ = [
    "ScramClient",
    "ScramError",
    "ScramSecret",
    "ScramServer",
    "make_server_key_material",
    "md5_password_hash",
    "md5_response",
    "md5_verify",
]
