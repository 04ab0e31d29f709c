"""Log output of the command-line programs: human-readable text or one JSON object per line.

Only the CLIs configure handlers (library code just logs). ``--log-format json`` is for log
shippers (Loki, Elasticsearch, Cloud Logging): every record becomes one line with ``ts``
(RFC 3339, UTC), ``level``, ``logger``, ``message``, the process id, and the ids the message
is about (``job_id``, ``shard``, ``node_id``, ``attempt``) when the code passed them in
``extra=`` or they can be read off the message (``job 1f2e... shard 3 ... node local-0-ab12``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import sys

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging"]

LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ID_FIELDS = ("job_id", "shard", "node_id", "attempt")
_IDS = re.compile(r"\b(job|shard|node|attempt) ([A-Za-z0-9_.:-]+)")
_FIELD_OF = {"job": "job_id", "shard": "shard", "node": "node_id", "attempt": "attempt"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            "pid": record.process,
        }
        for word, value in _IDS.findall(message):
            field = _FIELD_OF[word]
            if field not in out and not (field == "shard" and not value.isdigit()):
                out[field] = int(value) if field == "shard" else value
        for field in _ID_FIELDS:
            if hasattr(record, field):
                out[field] = getattr(record, field)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Send the root logger's records to stderr as ``fmt`` (``text`` or ``json``) from ``level``.

    Raises:
        ValueError: an unknown format or level.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (DEBUG, INFO, WARNING or ERROR)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
