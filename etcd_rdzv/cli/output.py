"""What ``etcd-rdzv`` prints on stdout: lines, flushed one at a time, and wall-clock times."""

from __future__ import annotations

import time
from collections.abc import Iterable


def emit(line: str) -> None:
    print(line, flush=True)


def emit_all(lines: Iterable[str]) -> None:
    for line in lines:
        emit(line)


def clock(unix_time: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_time))
