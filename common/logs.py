"""How the package's log lines reach a torchrun agent's output.

torchrun configures only torch's loggers: ``LOGLEVEL`` (default ``WARNING``) sets the level of the
loggers torch's launcher and agent make with ``get_logger``, and ``torch._logging`` gives the
``torch`` logger a stderr handler at ``WARNING``. Every other logger, ours and torch's own dynamic
rendezvous among them, stays at ``WARNING``: the line a handler logs at INFO for each completed
round never shows. So the torchrun plugins give the package's loggers a stderr handler of their
own, at INFO unless ``LOGLEVEL`` says otherwise; a process that configured logging itself (a
handler on the root logger, or on one of ours) is left as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

# The package's top-level loggers (modules log to ``logging.getLogger(__name__)`` below them).
PACKAGE_LOGGERS = ("rdzv_common", "etcd_rdzv", "c10d_rdzv")
DEFAULT_LEVEL = "INFO"
# Like torch's own lines: level letter, date and time, pid, where, then the message.
FORMAT = "%(levelname).1s%(asctime)s %(process)d %(name)s] %(message)s"
DATE_FORMAT = "%m%d %H:%M:%S"


def show_package_logs(environ: Mapping[str, str] = os.environ) -> None:
    """Send the package's log lines to stderr at ``LOGLEVEL`` (INFO when unset), unless this
    process configured logging itself; calling it again changes nothing."""
    if logging.getLogger().handlers:
        return
    level = environ.get("LOGLEVEL", "").strip().upper() or DEFAULT_LEVEL
    if not isinstance(logging.getLevelName(level), int):
        level = DEFAULT_LEVEL
    for name in PACKAGE_LOGGERS:
        logger = logging.getLogger(name)
        if logger.handlers:
            continue
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(level)
