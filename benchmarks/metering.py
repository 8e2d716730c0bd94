"""Counts what nodes write to a rendezvous backend, by wrapping backend classes from outside.

Nothing in the backends is edited: the first time a backend class is seen, its ``set_state`` and
``get_state`` (and, where present, ``mailbox.post`` and ``liveness.beat``) are wrapped in this
process to count calls and bytes. Requests to the server are counted at the client, where every one
of a backend's requests passes (each attempt of a retried request counts): ours on etcd
(``EtcdClient.request``), ours on c10d (``StoreCalls``) and torch's ``etcd-v2`` (python-etcd's
``Client.api_execute``). torch's ``c10d`` calls the C++ ``TCPStore`` directly, so its requests are
not counted. Streams (watches, lease keep-alives) are not requests. Counts are process-wide and read
with ``take``.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter

_lock = threading.Lock()
_counts: Counter = Counter()
_patched: set[tuple[type, str]] = set()


def _add(**amounts: int) -> None:
    with _lock:
        _counts.update(amounts)


def take() -> dict[str, int]:
    """Return the counts since the last ``take`` and start counting afresh."""
    with _lock:
        snapshot = dict(_counts)
        _counts.clear()
    return snapshot


def _size(value) -> int:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    return 0


def _set_state_wrapper(fn):
    @functools.wraps(fn)
    def set_state(self, state, token=None, *args, **kwargs):
        result = fn(self, state, token, *args, **kwargs)
        won = bool(result is not None and len(result) > 2 and result[2])
        _add(set_state_calls=1, set_state_bytes=_size(state), set_state_won=int(won))
        return result

    return set_state


def _get_state_wrapper(fn):
    @functools.wraps(fn)
    def get_state(self, *args, **kwargs):
        result = fn(self, *args, **kwargs)
        _add(get_state_calls=1, get_state_bytes=_size(result[0]) if result else 0)
        return result

    return get_state


def _post_wrapper(fn):
    @functools.wraps(fn)
    def post(self, record, *args, **kwargs):
        result = fn(self, record, *args, **kwargs)
        _add(mailbox_posts=1, mailbox_bytes=_size(record))
        return result

    return post


def _beat_wrapper(fn):
    @functools.wraps(fn)
    def beat(self, *args, **kwargs):
        result = fn(self, *args, **kwargs)
        _add(liveness_beats=1)
        return result

    return beat


def _request_wrapper(fn):
    """For a method whose first argument is a callable run once per attempt (``EtcdClient.request``)."""

    @functools.wraps(fn)
    def request(self, op, *args, **kwargs):
        def counted(*op_args, **op_kwargs):
            _add(requests=1)
            return op(*op_args, **op_kwargs)

        return fn(self, counted, *args, **kwargs)

    return request


def _call_wrapper(fn):
    """For a method that is one request per call (``StoreCalls.__call__``, ``api_execute``)."""

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        _add(requests=1)
        return fn(self, *args, **kwargs)

    return call


def _client_classes() -> list[tuple[type, str, object]]:
    """The client choke points of the backends that are importable here."""
    points = []
    try:
        from etcd_rdzv.run import EtcdClient

        points.append((EtcdClient, "request", _request_wrapper))
    except ImportError:
        pass
    try:
        from c10d_rdzv.calls import StoreCalls

        points.append((StoreCalls, "__call__", _call_wrapper))
    except ImportError:
        pass
    try:
        import etcd  # python-etcd, torch's etcd-v2 client

        points.append((etcd.Client, "api_execute", _call_wrapper))
    except ImportError:
        pass
    return points


def _patch(cls: type, method: str, wrapper) -> bool:
    key = (cls, method)
    if key in _patched:
        return True
    original = getattr(cls, method, None)
    if original is None or not callable(original):
        return False
    setattr(cls, method, wrapper(original))
    _patched.add(key)
    return True


def instrument(backend) -> list[str]:
    """Start counting ``backend``'s writes; return what is metered (e.g. ``["set_state", ...]``)."""
    metered = []
    for method, wrapper in (("set_state", _set_state_wrapper), ("get_state", _get_state_wrapper)):
        if _patch(type(backend), method, wrapper):
            metered.append(method)
    for attr, method, wrapper in (("mailbox", "post", _post_wrapper), ("liveness", "beat", _beat_wrapper)):
        part = getattr(backend, attr, None)
        if part is not None and _patch(type(part), method, wrapper):
            metered.append(f"{attr}.{method}")
    for cls, method, wrapper in _client_classes():
        _patch(cls, method, wrapper)
    return metered
