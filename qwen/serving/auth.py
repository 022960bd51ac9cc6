"""Who may call the API: a Bearer key and/or an HTTP Basic login, checked per route (inside CORS, so browser
preflights are answered without credentials), compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import Request

from .http import APIError

AUTH_REALM = "Qwen API"


def basic_credentials(header: str) -> str | None:
    """'user:pass' from an 'Authorization: Basic ...' header value, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def bearer_token(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def make_auth_check(api_key: str | None, api_auth: str | None):
    """A route dependency accepting `Authorization: Bearer <api_key>` and/or `Basic <user:pass>`."""
    # header reader → the secret it must match; compared in constant time
    accepted = [(read, secret) for read, secret in ((bearer_token, api_key), (basic_credentials, api_auth))
                if secret is not None]
    challenges = ", ".join(
        f'Bearer realm="{AUTH_REALM}"' if read is bearer_token else f'Basic realm="{AUTH_REALM}", charset="UTF-8"'
        for read, _ in accepted
    )

    async def check(request: Request) -> None:
        if not accepted:
            return
        header = request.headers.get("authorization", "")
        matches = [hmac.compare_digest((read(header) or "").encode(), secret.encode()) for read, secret in accepted]
        if not any(matches):
            kinds = " or ".join(("an 'Authorization: Bearer <key>' header" if read is bearer_token else
                                 "HTTP Basic credentials") for read, _ in accepted)
            raise APIError(401, f"invalid or missing credentials: this server needs {kinds}",
                           code="invalid_api_key", headers={"WWW-Authenticate": challenges})

    return check


def describe_auth(api_key: str | None, api_auth: str | None) -> str:
    """What a client must send, for the start-up line."""
    kinds = [kind for kind, secret in (("Bearer key", api_key), ("Basic login", api_auth)) if secret is not None]
    return " or ".join(kinds) if kinds else "off"


def check_secrets(api_key: str | None, api_auth: str | None) -> None:
    """Refuse settings that would silently weaken auth: an empty key, or a Basic login without user/password."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty, which would turn authentication off; give a key, or none at all")
    if api_auth is not None:
        user, colon, password = api_auth.partition(":")
        if not colon or not user or not password:
            raise ValueError("the Basic login must be USER:PASSWORD with neither part empty")
