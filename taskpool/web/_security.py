"""Who may look and who may act on the dashboard, and which requests may act at all.

Decisions only, over plain request facts (pure, no I/O): the app gathers the facts
and applies the answer. Acting (cancel, retry) takes three things:

- **access**: the dashboard is read-only unless the host gave an auth callback or a
  token. With a token, every page asks for it (a login form sets a session cookie;
  API callers send `Authorization: Bearer`); with a callback, the host decides.
- **a request no other site can forge**: a JSON body (`Content-Type:
  application/json`; a browser sends that cross-site only after a CORS preflight,
  which this app never grants), the dashboard's CSRF token in a header (a page of
  another origin cannot read it), and, when the browser says where the request comes
  from (`Origin`, `Sec-Fetch-Site`), this very origin. A bearer token is not sent by
  browsers on their own, so it needs no CSRF token.
- **a bounded, well-formed body**: over the limit is 413, not JSON or not an object
  of the expected fields is 400.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

SESSION_COOKIE = "taskpool_session"
CSRF_HEADER = "x-csrf-token"
JSON_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ActionFacts:
    """What the app knows of a state-changing request before reading its body."""

    content_type: str | None
    origin: str | None  # the Origin header, if the browser sent one
    own_origin: str  # scheme://host[:port] this request was addressed to
    sec_fetch_site: str | None
    csrf_header: str | None
    expected_csrf: str
    by_bearer: bool  # authenticated by an Authorization header, not by a cookie
    content_length: str | None
    max_body_bytes: int


def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json` (pure)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def same_origin(origin: str, own_origin: str) -> bool:
    """Whether an Origin header names this origin (scheme, host and port alike)."""
    if origin == "null":
        return False
    theirs, ours = urlsplit(origin.lower()), urlsplit(own_origin.lower())
    return (theirs.scheme, theirs.netloc) == (ours.scheme, ours.netloc)


def refuse_action(facts: ActionFacts) -> Refusal | None:
    """Why this state-changing request must not act, or None if it may (pure).

    Checked before the body is read; access itself is checked before this."""
    if facts.origin is not None and not same_origin(facts.origin, facts.own_origin):
        return Refusal(403, "cross-origin request refused")
    if facts.sec_fetch_site not in (None, "same-origin", "none"):
        return Refusal(403, f"cross-site request refused ({facts.sec_fetch_site})")
    if media_type(facts.content_type) != JSON_TYPE:
        return Refusal(415, f"the body must be {JSON_TYPE}")
    if not facts.by_bearer and not (
        facts.csrf_header is not None
        and hmac.compare_digest(facts.csrf_header, facts.expected_csrf)
    ):
        return Refusal(403, f"missing or wrong CSRF token (header {CSRF_HEADER})")
    if facts.content_length is not None:
        if not facts.content_length.isdigit():
            return Refusal(400, "bad Content-Length")
        if int(facts.content_length) > facts.max_body_bytes:
            return Refusal(413, f"request body over {facts.max_body_bytes} bytes")
    return None


def parse_json_object(body: bytes, allowed: Mapping[str, type]) -> dict[str, Any] | Refusal:
    """The body as a JSON object of only `allowed` fields with those types (pure)."""
    try:
        value = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        return Refusal(400, f"the body is not JSON: {exc}")
    if not isinstance(value, dict):
        return Refusal(400, "the body must be a JSON object")
    for key, item in value.items():
        kind = allowed.get(key)
        if kind is None:
            return Refusal(400, f"unknown field {key!r}")
        if type(item) is not kind:  # bool is not accepted for int, nor int for bool
            return Refusal(400, f"field {key!r} must be {kind.__name__}")
    return value


def derive(secret: bytes, purpose: str, value: str = "") -> str:
    """A value only the holder of `secret` can make: sessions and CSRF tokens."""
    return hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()


def session_value(secret: bytes, token: str) -> str:
    """The session cookie's value for someone who gave the right token."""
    return derive(secret, "session", token)


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if authorization is None:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def safe_next(path: str | None, base: str) -> str:
    """Where to go after logging in: a path under the dashboard, never another site."""
    if path and path.startswith(base + "/") and not path.startswith("//") and "\\" not in path:
        return path
    return base + "/"
