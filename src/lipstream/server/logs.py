"""API keys never reach a log line. Browsers send the key in the URL (`?key=...`, the only way onto a
WebSocket), and uvicorn's access log writes URLs; so every log record of the process has its
`key=<value>` query values replaced by `key=***` as it is made, whatever logger, handler or format
writes it afterwards (uvicorn formats its access lines from the record's arguments, which are redacted
too)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

KEY_VALUE = re.compile(r"(?<![A-Za-z0-9_])(key=)[^&\s\"'#;,)]+", re.IGNORECASE)
REDACTED = r"\1***"


def redact_keys(text: str) -> str:
    """`text` with the value of every `key=` query parameter replaced by `***`."""
    return KEY_VALUE.sub(REDACTED, text)


def _redacted(value: object) -> object:
    return redact_keys(value) if isinstance(value, str) else value


def install_key_redaction() -> None:
    """Make every log record of the process redact `key=` values in its message and arguments
    (idempotent)."""
    factory: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
    if getattr(factory, "redacts_keys", False):
        return

    def make_record(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.msg = _redacted(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {name: _redacted(arg) for name, arg in record.args.items()}
        return record

    make_record.redacts_keys = True
    logging.setLogRecordFactory(make_record)
