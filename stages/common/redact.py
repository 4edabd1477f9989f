"""Credentials in source URLs: the URL is fetched as given, and shown everywhere else redacted.

A URL may carry a secret in its user info (``https://user:password@host/...``) or in its query
(presigned S3/GCS/Azure URLs: ``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Goog-Signature``,
``sig``; API ``token``/``key``/``password`` parameters). :func:`redact_url` replaces each such
value with ``***``; the manifest, the logs, the error messages and the MLflow params hold that
form only. ``params.yaml`` itself, and so git and ``dvc.lock``, hold what is written there: put
the secret part in an environment variable (``?${SALES_URL_QUERY}``), which ingest expands
(:func:`expand_env`) only when it opens the URL.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

MASK = "***"
# query parameters whose value is a secret (lower case); names containing one of the PARTS too
SECRET_PARAMS = frozenset(
    {
        "sig",
        "signature",
        "key",
        "apikey",
        "api_key",
        "token",
        "pwd",
        "pass",
        "password",
        "secret",
        "auth",
        "access_token",
        "code",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "awsaccesskeyid",
    }
)
SECRET_PARTS = ("signature", "credential", "token", "secret", "password", "apikey", "api_key")
ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def is_secret_param(name: str) -> bool:
    """Whether a query parameter called ``name`` carries a credential."""
    lowered = name.lower()
    return lowered in SECRET_PARAMS or any(part in lowered for part in SECRET_PARTS)


def secret_values(url: str) -> list[str]:
    """The credential values in ``url`` (user info, secret query values), longest first."""
    if "://" not in url:
        return []
    parts = urlsplit(url)
    http = parts.scheme.lower() in ("http", "https")
    # user:password@: the password; an http(s) user name alone is often a token (ghp_...@)
    found = [parts.password] if parts.password else [parts.username] if http else []
    found += [
        value
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if is_secret_param(name)
    ]
    found = [value for value in found if value and not ENV_VAR.fullmatch(value)]
    return sorted(set(found), key=len, reverse=True)


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries a password, an http(s) user token or a secret query value."""
    return bool(secret_values(url))


def redact_url(url: str) -> str:
    """``url`` with its user info and secret query values replaced by ``***``.

    ``https://u:p@host/a.csv?X-Amz-Signature=ab&v=1`` ->
    ``https://***@host/a.csv?X-Amz-Signature=***&v=1``; a URL without credentials (and a
    plain path) comes back unchanged.
    """
    if not has_credentials(url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc and _masked("", parts.password or parts.username or ""):
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        # a database user name is kept (it is not the secret); an http(s) one may be a token
        keep = parts.password is not None and parts.scheme not in ("http", "https")
        netloc = f"{user}:{MASK}@{host}" if keep else f"{MASK}@{host}"
    query = "&".join(
        f"{_quote(name)}={MASK if _masked(name, value) else _quote(value)}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _masked(name: str, value: str) -> bool:
    # env placeholders (${NAME}) are shown as written: they are not the secret
    return bool(value) and not ENV_VAR.fullmatch(value) and (not name or is_secret_param(name))


def _quote(text: str) -> str:
    return quote(text, safe="-_.~/:${}")


def scrub(text: str, url: str) -> str:
    """``text`` (an error message, a log line) with ``url``'s credential values masked.

    Libraries quote the URL back in their own spelling (re-encoded, decoded), so each secret
    value is masked in its raw, quoted and unquoted forms, not just the URL as a whole.
    """
    for value in secret_values(url):
        for form in {value, unquote(value), quote(value, safe=""), quote(unquote(value), safe="")}:
            if len(form) >= 3:
                text = text.replace(form, MASK)
    return text


def expand_env(source: str) -> str:
    """``source`` with each ``${NAME}`` replaced by that environment variable's value.

    Raises:
        KeyError: a variable is not set (its name is the key).
    """

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise KeyError(name)
        return os.environ[name]

    return ENV_VAR.sub(value, source)


# URLs whose credentials are masked in every log record made while a fetch of them is open
_ACTIVE: list[str] = []
_ACTIVE_LOCK = threading.Lock()
# (our factory, the one it wraps) while installed
_INSTALLED: list[tuple[Callable[..., Any], Callable[..., Any]]] = []


def _scrubbing_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., Any]:
    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        urls = list(_ACTIVE)
        if urls:
            _scrub_record(record, urls)
        return record

    return make_record


def _scrub_record(record: logging.LogRecord, urls: list[str]) -> None:
    if record.exc_info and not record.exc_text:  # the handler's formatter reuses exc_text
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    texts = {
        "msg": record.getMessage(),
        "exc_text": record.exc_text,
        "stack_info": record.stack_info,
    }
    for field, text in texts.items():
        for url in urls:
            text = scrub(text, url) if text else text
        setattr(record, field, text)
    record.args = None


@contextmanager
def scrubbed_logs(url: str) -> Iterator[None]:
    """While open, every log record has ``url``'s credentials masked, whatever logger made it.

    A filter on a logger sees only that logger's own records, not its children's (``fsspec``'s
    filter misses ``fsspec.asyn``, ``s3fs``, ``botocore.*``, ``aiohttp.*``), so the masking is
    done where every record is made: the log record factory, from any thread (fsspec fetches on
    its own event-loop thread). Message, arguments, traceback and stack text are all masked.
    """
    if not has_credentials(url):
        yield
        return
    with _ACTIVE_LOCK:
        if not _ACTIVE:
            previous = logging.getLogRecordFactory()
            _INSTALLED[:] = [(_scrubbing_factory(previous), previous)]
            logging.setLogRecordFactory(_INSTALLED[0][0])
        _ACTIVE.append(url)
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.remove(url)
            if not _ACTIVE and _INSTALLED:
                factory, previous = _INSTALLED.pop()
                # restored unless another library has wrapped ours since (ours, left in its
                # chain, then passes records through unchanged)
                if logging.getLogRecordFactory() is factory:
                    logging.setLogRecordFactory(previous)
