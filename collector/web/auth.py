"""Basic auth for the web server: bcrypt hashes from the web configuration
file's `basic_auth_users`, a cache of successes, a decoy hash for unknown
users."""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections import OrderedDict
from typing import Mapping

import bcrypt

__all__ = ["BasicAuth"]


class BasicAuth:
    """Checks credentials against bcrypt hashes, caching successes.

    bcrypt at cost 10 takes tens of milliseconds; Prometheus sends the same
    credentials every scrape, so a success is remembered under a SHA-256 of
    (user, password, hash). Only successes are cached, so a wrong password
    always pays the full bcrypt cost. Unknown users are checked against a
    decoy hash so response time does not reveal which user names exist.
    """

    CACHE_SIZE = 256

    def __init__(self, users: Mapping[str, bytes]):
        self.users = dict(users)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._decoy = bcrypt.hashpw(b"decoy", bcrypt.gensalt(rounds=10)) if users else b""
        self.bcrypt_calls = 0  # for tests: proves the cache is used

    def check(self, header: str | None) -> bool:
        if header is None or header[:6].lower() != "basic ":  # the scheme is case-insensitive (RFC 7617)
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        if not sep:
            return False
        hashed = self.users.get(user)
        key = hashlib.sha256(b"\0".join([user.encode(), password.encode(), hashed or b""])).digest()
        if hashed is not None:
            with self._lock:
                if key in self._ok:
                    self._ok.move_to_end(key)
                    return True
        self.bcrypt_calls += 1
        try:
            ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else self._decoy)
        except ValueError:
            ok = False
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                self._ok[key] = None
                while len(self._ok) > self.CACHE_SIZE:
                    self._ok.popitem(last=False)
        return ok
