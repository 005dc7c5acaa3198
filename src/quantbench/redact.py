"""Secrets never reach MLflow or the job log: the credentials of a URI (tracking.uri, MLFLOW_TRACKING_URI, a
database URI: `user:password@` and `?password=` parts), the values of config keys and environment variables named
like a secret (HF_TOKEN, *_token, *password*, *secret*, *api_key*), and any later occurrence of those values in text.

Why: a run's params, tags and config YAML are readable by everyone who can read the store (and end up in reports and
registered models); a job log is pasted into issues. What is masked reads `***`; the rest of the URI (scheme, host,
port, database) stays, so that a run still says where it was logged.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"
# HF_TOKEN, MLFLOW_TRACKING_PASSWORD, PGPASSWORD, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY; not prompt_tokens, tokenizer,
# cache_key (and only string values are masked: bos_token_id is a number)
SECRET_NAME = re.compile(
    r"(?:^|[_.\-])(?:token|secret|api[_-]?key|access[_-]?key|credentials?)(?:$|[_.\-])|passw(?:or)?d", re.I
)
MIN_SECRET_CHARS = 6  # a shorter value ("1", "true", "hf") would mask ordinary text wherever it occurs
# scheme://user:password@ , also as Hydra prints overrides (http\://user\:password@...)
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*\\?://)[^/?#@\s'\"]+@", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;][^=&#\s]*(?:token|passw(?:or)?d|secret|api[_-]?key)[^=&#\s]*=)[^&#\s'\"]+", re.I
)
_known: set[str] = set()  # secret values seen in this process (longest first when masking)


def remember(value: Any) -> None:
    """Mask `value` wherever it occurs in text from now on (values shorter than MIN_SECRET_CHARS are not)."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_CHARS:
        _known.add(value)
        if unquote(value) != value:
            _known.add(unquote(value))


def remember_uri(uri: str) -> None:
    """The password of a URI, as written and decoded (`p%40ss` is `p@ss` to the server)."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        return
    if password:
        remember(password)
        remember(unquote(password))


def remember_environment() -> None:
    """Environment variables named like a secret (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ...) and
    the passwords of URIs in any variable (MLFLOW_TRACKING_URI, DATABASE_URL)."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name):
            remember(value)
        if "://" in value:
            remember_uri(value)


def remember_config(obj: Any) -> None:
    """Values under keys named like a secret, and the passwords of URIs anywhere in a config (a plain container)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if SECRET_NAME.search(str(key)) and isinstance(value, str):
                remember(value)
            remember_config(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            remember_config(value)
    elif isinstance(obj, str) and "://" in obj:
        remember_uri(obj)


def text(value: str) -> str:
    """`value` with URI credentials and every remembered secret masked."""
    value = _USERINFO.sub(rf"\g<scheme>{MASK}@", value)
    value = _QUERY_SECRET.sub(rf"\g<key>{MASK}", value)
    for secret in sorted(_known, key=len, reverse=True):
        if secret in value:
            value = value.replace(secret, MASK)
    return value


def config(obj: Any) -> Any:
    """A plain config container with secret-named keys' values masked and every string passed through `text`."""
    if isinstance(obj, dict):
        return {
            k: MASK if SECRET_NAME.search(str(k)) and isinstance(v, str) and v else config(v) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [config(v) for v in obj]
    return text(obj) if isinstance(obj, str) else obj


def install_log_filter() -> None:
    """Mask secrets in every log record this process makes from now on, whatever handler writes it (Hydra's job log
    file and console, MLflow's own handler): done where records are made, so that handlers replaced by Hydra's next
    job keep it. Idempotent."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts_secrets", False):
        return

    def redacting_factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report, when a handler formats it
            return record
        clean = text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info:
            record.exc_text = text(logging.Formatter().formatException(record.exc_info))
        return record

    redacting_factory.redacts_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
