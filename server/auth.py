"""Callers and accounts: bearer tokens, the accounts each may act for, and local mode.

Tokens are configured in a JSON file (IMAGEGEN_AUTH_TOKENS_FILE) by their SHA-256 only, so the file
holds nothing a thief could present:

    {"callers": [
        {"name": "ads-backend", "token_sha256": "9f86d0…", "accounts": ["acme", "globex"]},
        {"name": "ops-console", "token_sha256": "60303a…", "accounts": "*"}
    ]}

`python -m server token --name ads-backend --accounts acme,globex` makes a token and prints its entry.
With no file the server is in local mode: loopback only, one account, `default`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.errors import ServiceError
from server.validation import FieldViolation, InvalidRequest

ACCOUNT_HEADER = "x-account-id"
LOCAL_ACCOUNT = "default"
_ACCOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_TOKEN_HASH = re.compile(r"[0-9a-f]{64}")


class AuthConfigError(ValueError):
    """The tokens file cannot be used."""


@dataclass(frozen=True, kw_only=True)
class Caller:
    """Who presented a token, and which accounts they may act for (None: every account)."""

    name: str
    accounts: frozenset[str] | None

    def may_use(self, account: str) -> bool:
        """Whether this caller may act for `account`."""
        return self.accounts is None or account in self.accounts


def token_digest(token: str) -> str:
    """The SHA-256 hex digest under which a token is configured."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return "igt_" + secrets.token_urlsafe(32)


class Authenticator:
    """Maps request metadata to the account a call acts for, or refuses the call."""

    def __init__(self, callers: Mapping[str, Caller] | None) -> None:
        #: token digest -> caller; None means local mode
        self._callers = callers

    @classmethod
    def local(cls) -> Authenticator:
        """Local mode: no tokens, one account."""
        return cls(None)

    @classmethod
    def from_file(cls, path: Path) -> Authenticator:
        """Read a tokens file (see the module docstring)."""
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AuthConfigError(f"cannot read the tokens file {path}: {exc}") from exc
        return cls(_parse_callers(document, path))

    @property
    def local_mode(self) -> bool:
        """Whether no tokens are configured."""
        return self._callers is None

    def account(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The account this call acts for, or UNAUTHENTICATED / PERMISSION_DENIED / INVALID_ARGUMENT."""
        return self.identify(metadata)[1]

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, str]:
        """(the caller's name, the account the call acts for); in local mode both are the one account."""
        token = requested = None
        for key, value in metadata:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if key == "authorization":
                token = text
            elif key == ACCOUNT_HEADER:
                requested = text
        if requested is not None and not _ACCOUNT_ID.fullmatch(requested):
            raise InvalidRequest(
                [FieldViolation(ACCOUNT_HEADER, "must be 1-128 of letters, digits, '_', '-'")]
            )
        if self._callers is None:
            if requested not in (None, LOCAL_ACCOUNT):
                raise ServiceError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"this server runs in local mode and serves only the {LOCAL_ACCOUNT!r} account; "
                    "configure IMAGEGEN_AUTH_TOKENS_FILE to serve others",
                )
            return LOCAL_ACCOUNT, LOCAL_ACCOUNT
        caller = self._caller(token)
        if requested is None:
            if caller.accounts is not None and len(caller.accounts) == 1:
                return caller.name, next(iter(caller.accounts))
            raise InvalidRequest(
                [FieldViolation(ACCOUNT_HEADER, f"is required: {caller.name} may act for several accounts")]
            )
        if not caller.may_use(requested):
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED, f"{caller.name} may not act for account {requested}"
            )
        return caller.name, requested

    def _caller(self, authorization: str | None) -> Caller:
        assert self._callers is not None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
            )
        caller = self._callers.get(token_digest(token.strip()))
        if caller is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return caller


def _parse_callers(document: Any, path: Path) -> dict[str, Caller]:
    entries = document.get("callers") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise AuthConfigError(f'{path}: expected {{"callers": [...]}}')
    callers: dict[str, Caller] = {}
    for index, entry in enumerate(entries):
        where = f"{path}: callers[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise AuthConfigError(f"{where}: needs a non-empty 'name'")
        digest = entry.get("token_sha256")
        if not isinstance(digest, str) or not _TOKEN_HASH.fullmatch(digest):
            raise AuthConfigError(f"{where}: 'token_sha256' must be 64 lowercase hex digits")
        accounts = entry.get("accounts")
        if accounts == "*":
            allowed = None
        elif (
            isinstance(accounts, list)
            and accounts
            and all(isinstance(a, str) and _ACCOUNT_ID.fullmatch(a) for a in accounts)
        ):
            allowed = frozenset(accounts)
        else:
            raise AuthConfigError(f"{where}: 'accounts' must be \"*\" or a non-empty list of account ids")
        if digest in callers:
            raise AuthConfigError(f"{where}: the same token is configured twice")
        callers[digest] = Caller(name=entry["name"], accounts=allowed)
    return callers


def caller_entry(name: str, token: str, accounts: list[str] | None) -> dict[str, Any]:
    """The tokens-file entry for a token."""
    return {
        "name": name,
        "token_sha256": token_digest(token),
        "accounts": "*" if accounts is None else accounts,
    }
