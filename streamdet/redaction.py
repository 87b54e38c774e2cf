"""Credentials out of every text streamdet shows: URLs, error messages, log lines.

A camera URL can carry credentials in three places, and each is masked with ``***``:

- the userinfo, ``rtsp://user:password@host``: the password (the user name stays, it helps to
  find a wrong account). The password may hold raw ``/``, ``?``, ``#``, ``@`` or ``:``, so a
  raw ``@`` later in the URL (``?mail=a@b.com``) makes the mask run to it: it hides more of
  such a URL, never less.
- query parameters, ``?user=admin&password=...`` (``&`` or ``;`` between them);
- vendor path segments, ``/user=admin_password=..._channel=1_stream=0.sdp`` (``_``, ``&`` or
  ``;`` between them).

A parameter is credential-like when a word of its name (split at ``_ - .``, camelCase and
percent-encoding) is one of :data:`SECRET_WORDS` or :data:`USER_WORDS`, or the whole name is
one of the joined forms (``apikey``, ``loginpas``...). Whole words only: ``keyframes`` or
``monkey`` are not ``key``. Host, port, path and other parameters stay as they were.

:func:`register_secrets` remembers a URL's secrets (not its user names), so that
:func:`redact_text` also masks them where no URL surrounds them, e.g. in an FFmpeg message.

This module imports nothing from the rest of streamdet, so any part (sources, sinks, the CLI)
can use it.

Example:
    >>> redact_url("rtsp://admin:s3cret@10.0.0.5:554/stream1")
    'rtsp://admin:***@10.0.0.5:554/stream1'
    >>> redact_url("rtsp://10.0.0.5/cam?user=admin&password=s3cret&channel=1")
    'rtsp://10.0.0.5/cam?user=***&password=***&channel=1'
"""

from __future__ import annotations

import re
import string
import threading
import urllib.parse
from typing import NamedTuple

MASK = "***"

SECRET_WORDS = frozenset(
    {
        "pass",
        "passwd",
        "password",
        "passphrase",
        "passcode",
        "pwd",
        "pw",
        "psw",
        "token",
        "auth",
        "authorization",
        "key",
        "apikey",
        "secret",
        "credential",
        "credentials",
        "signature",
        "sig",
    }
)
"""Words that make a parameter's value a secret: masked, and registered for :func:`redact_text`."""

USER_WORDS = frozenset({"user", "username", "usr", "uname", "login"})
"""Words that make a parameter's value a user name: masked in URLs, not registered."""

_SECRET_JOINED = frozenset(
    {
        "loginpas",
        "loginpass",
        "loginpwd",
        "loginpassword",
        "userpwd",
        "userpass",
        "userpassword",
        "accesstoken",
        "authtoken",
        "sessiontoken",
        "authkey",
        "accesskey",
        "secretkey",
        "privatekey",
    }
)
_USER_JOINED = frozenset({"loginuse", "loginuser", "loginname", "userid"})

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S*")
# ``name=`` or ``name%3D``: the end of a parameter name, and so the start of its value.
_EQUALS = re.compile(r"=|%3[Dd]")
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "%._-")
# What follows a separator where a new parameter starts: ``name=``. After a "_" or a "?" (which
# a path-style password may hold) the name has no "_", so "p?ss_channel=1" is one value.
_NEXT_PARAM = re.compile(r"[A-Za-z0-9%._\-]+(?:=|%3[Dd])")
_NEXT_PARAM_NO_UNDERSCORE = re.compile(r"[A-Za-z0-9%.\-]+(?:=|%3[Dd])")
# A plausible ``host[:port]`` right after an "@", ending the authority.
_HOST_AFTER_AT = re.compile(r"(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d*)?(?=[/?#;]|$)")
_USER_PART = re.compile(r"[^:/?#@\s]*:")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
_PUNCTUATION = ".,:;!?)]}'\""  # may follow a URL in a message
_MIN_REGISTERED = 3  # shorter secrets would mask ordinary words in every later message

_secrets: set[str] = set()
_secrets_lock = threading.Lock()  # protects _secrets: sources register from capture threads


class _Span(NamedTuple):
    """``url[start:end]`` is a credential; ``secret`` is False for a user name."""

    start: int
    end: int
    secret: bool


def classify_name(name: str) -> str | None:
    """``"secret"``, ``"user"`` or None for a URL parameter's name.

    Args:
        name: the name as it appears in the URL (may be percent-encoded).

    Example:
        >>> [classify_name(n) for n in ("Password", "api_key", "userName", "monkey", "channel")]
        ['secret', 'secret', 'user', None, None]
    """
    words = _CAMEL.sub(r"\1_\2", urllib.parse.unquote(name)).lower()
    tokens = set(re.split(r"[^a-z0-9]+", words)) - {""}
    joined = re.sub(r"[^a-z0-9]+", "", words)
    if tokens & SECRET_WORDS or joined in _SECRET_JOINED:
        return "secret"
    if tokens & USER_WORDS or joined in _USER_JOINED:
        return "user"
    return None


def _authority_end(url: str, start: int) -> int:
    """Where the authority that starts at ``start`` ends, read as FFmpeg does (at ``/?#``)."""
    for index in range(start, len(url)):
        if url[index] in "/?#":
            return index
    return len(url)


def _userinfo_spans(url: str, start: int, end: int) -> list[_Span]:
    """The userinfo password, read two ways, since either may be what the user meant.

    As FFmpeg reads it, the authority ends at the first ``/?#`` and the password runs to its last
    ``@``. A password with a raw ``/``, ``?`` or ``#`` ends that authority early, so the password
    is also read from the first ``:`` to the last ``@`` that is followed by a plausible host.
    """
    spans = []
    at = url.rfind("@", start, end)
    colon = url.find(":", start, at) if at != -1 else -1
    if colon != -1:
        spans.append(_Span(colon + 1, at, True))
    user = _USER_PART.match(url, start)
    if user is not None:
        hosts = [
            i
            for i in range(user.end(), len(url))
            if url[i] == "@" and _HOST_AFTER_AT.match(url, i + 1)
        ]
        if hosts:
            spans.append(_Span(user.end(), hosts[-1], True))
    return spans


def _ends_value(url: str, index: int, in_path: bool) -> bool:
    """Whether a value ends at ``index``: at a separator followed by ``name=`` (one not so
    followed is part of the value), or in the path at the segment's end (``/``)."""
    char = url[index]
    if char in "&;":
        return _NEXT_PARAM.match(url, index + 1) is not None
    if in_path and char in "_?":
        return _NEXT_PARAM_NO_UNDERSCORE.match(url, index + 1) is not None
    return in_path and char == "/"


def _value_end(url: str, start: int, in_path: bool) -> int:
    """Where the value that starts at ``start`` ends.

    A value already masked ends with its mask, so that text redacted twice (an error message
    quoting a redacted URL, ``...password=***: cannot open``) keeps the punctuation after it.
    """
    end = next((i for i in range(start, len(url)) if _ends_value(url, i, in_path)), len(url))
    masked = start + len(MASK)
    if url.startswith(MASK, start) and not url[masked:end].strip(_PUNCTUATION):
        return masked
    return end


def _after_equals(url: str, index: int, floor: int) -> bool:
    """Whether ``url[:index]`` ends with ``=`` or ``%3D`` (no further back than ``floor``)."""
    return url[index - 1 : index] == "=" or url[max(index - 3, floor) : index].upper() == "%3D"


def _name_before(url: str, index: int, floor: int) -> str:
    """The name of the parameter whose ``=`` is at ``index``.

    That is the run of name characters before it, but where the run starts inside another
    parameter's value (vendor paths join parameters with "_": ``user=admin_password=``), only
    its part after the last "_", so a value never lends its words to the next name.
    """
    start = index
    while start > floor and url[start - 1] in _NAME_CHARS and not _after_equals(url, start, floor):
        start -= 1
    name = url[start:index]
    return name.rpartition("_")[2] if start > floor and _after_equals(url, start, floor) else name


def _param_spans(url: str, rest: int) -> list[_Span]:
    """Values of credential-like parameters in the path and query that start at ``rest``."""
    query = url.find("?", rest)
    query = len(url) if query == -1 else query
    spans = []
    for equals in _EQUALS.finditer(url, rest):
        kind = classify_name(_name_before(url, equals.start(), rest))
        if kind is not None:
            end = _value_end(url, equals.end(), in_path=equals.start() < query)
            spans.append(_Span(equals.end(), end, kind == "secret"))
    return spans


def _credential_spans(url: str) -> list[_Span]:
    """Every credential in ``url`` (a single URL with a scheme), possibly overlapping."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return []
    end = _authority_end(url, scheme.end())
    spans = _userinfo_spans(url, scheme.end(), end) + _param_spans(url, end)
    return [span for span in spans if span.end > span.start]


def _merged(spans: list[_Span]) -> list[tuple[int, int]]:
    """The spans' ranges, sorted, with those that overlap or touch joined into one."""
    merged: list[tuple[int, int]] = []
    for start, end, _ in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _mask(url: str, spans: list[_Span]) -> str:
    """``url`` with each of the (merged) spans replaced by :data:`MASK`."""
    out, position = [], 0
    for start, end in _merged(spans):
        out += [url[position:start], MASK]
        position = end
    out.append(url[position:])
    return "".join(out)


def redact_url(url: str) -> str:
    """``url`` with every credential masked; a string without a scheme comes back unchanged.

    Args:
        url: one URL (``scheme://...``), a file path or a camera index.

    Example:
        >>> redact_url("rtsp://10.0.0.5/user=admin_password=s3cret_channel=1_stream=0.sdp")
        'rtsp://10.0.0.5/user=***_password=***_channel=1_stream=0.sdp'
        >>> redact_url("rtsp://admin:pa/ss@10.0.0.5/live")
        'rtsp://admin:***@10.0.0.5/live'
    """
    url = str(url)
    return _mask(url, _credential_spans(url))


def url_secrets(url: str) -> set[str]:
    """The secrets in ``url`` (not its user names) as typed, percent-decoded and encoded.

    Example:
        >>> sorted(url_secrets("rtsp://cam/x?usr=bob&pwd=p%40ss"))
        ['p%40ss', 'p@ss']
    """
    url = str(url)
    found = set()
    for span in _credential_spans(url):
        if span.secret:
            raw = url[span.start : span.end]
            decoded = urllib.parse.unquote(raw)
            if decoded != MASK:  # already redacted
                found.update({raw, decoded, urllib.parse.quote(decoded, safe="")})
    return {secret for secret in found if len(secret) >= _MIN_REGISTERED}


def register_secrets(url: str) -> None:
    """Remember the secrets in ``url`` so that :func:`redact_text` masks them in any text."""
    secrets = url_secrets(url)
    with _secrets_lock:
        _secrets.update(secrets)


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URL in it and every registered secret masked.

    A URL in text ends at whitespace; punctuation right after a masked value (a ``:`` or ``)``)
    is masked with it, as it could be part of the password.

    Example:
        >>> redact_text("rtsp://cam/live?token=abc123: 401 Unauthorized")
        'rtsp://cam/live?token=*** 401 Unauthorized'
    """
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group()), str(text))
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text
