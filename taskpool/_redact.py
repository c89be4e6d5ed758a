"""Hide passwords in text taskpool shows: log lines, error messages, reprs. Pure.

One function, `redact`, for every place: a DSN a worker prints, a driver error
that echoes the connection string, a `repr`. It knows the forms a database
credential takes in text:

- a URL's user info: `postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`;
- a `password=` (or `passwd=`, `pwd=`) keyword, as in a libpq conninfo string
  (`host=h password=secret`), a URL query (`?password=secret`) or a quoted
  value (`password='a b'`);
- libpq's `PGPASSWORD=secret`.

It redacts by form, so it also hides a password it was never told about (one
in an error message from another connection string). Given `secrets` (the
passwords of a DSN, from `dsn_secrets`), it also hides them wherever they appear
verbatim, for driver messages that quote a value without its keyword.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

#: What a redacted password reads as.
MASK = "***"

# scheme://user:password@ ; the password runs to the last '@' before the host part
# ends (a '/', '?', '#' or whitespace), so an unencoded '@' in it is still hidden.
_URL_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)(?P<secret>[^/?#\s]*)(?P<tail>@)"
)
# password=value, value quoted ('...' or "...") or bare (up to a separator).
_KEYWORD = re.compile(
    r"(?P<head>\b(?:PGPASSWORD|password|passwd|pwd)\s*=\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&;,'\"]+)",
    re.IGNORECASE,
)


def redact(text: str, *, secrets: Iterable[str] = ()) -> str:
    """`text` with every password it carries, and every one of `secrets`, replaced
    by `MASK`."""
    for secret in sorted(set(secrets), key=len, reverse=True):  # longest first
        if secret:
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", text)
    return _KEYWORD.sub(lambda m: f"{m['head']}{MASK}", text)


def dsn_secrets(dsn: str) -> tuple[str, ...]:
    """The passwords a connection string holds, as written and percent-decoded."""
    found: list[str] = []
    for match in _URL_USERINFO.finditer(dsn):
        found.append(match["secret"])
    for match in _KEYWORD.finditer(dsn):
        found.append(match["secret"].strip("'\""))
    return tuple({s for f in found for s in (f, urllib.parse.unquote(f)) if s})
