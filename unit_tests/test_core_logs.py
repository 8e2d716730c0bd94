"""``show_package_logs``: the package's log lines reach stderr under torchrun, which configures
only torch's loggers, and a process that configured logging itself is left alone."""

from __future__ import annotations

import logging

import pytest

from rdzv_common.logs import PACKAGE_LOGGERS, show_package_logs


def no_root_handlers(monkeypatch) -> None:
    """Set pytest's capture handlers on the root logger aside, as torchrun has none there (called
    in the test's body: pytest adds them after the fixtures' set-up)."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


@pytest.fixture
def bare_logging():
    """No handler and no level on our loggers; restored afterwards."""
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in PACKAGE_LOGGERS}
    for name in PACKAGE_LOGGERS:
        logging.getLogger(name).handlers = []
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    for name, (handlers, level) in saved.items():
        logging.getLogger(name).handlers = handlers
        logging.getLogger(name).setLevel(level)


def test_info_lines_reach_stderr_by_default(bare_logging, monkeypatch, capsys):
    no_root_handlers(monkeypatch)
    show_package_logs({})
    logging.getLogger("rdzv_common.handler").info("round 3 complete")
    logging.getLogger("etcd_rdzv.runtime.lessor").debug("hidden")
    err = capsys.readouterr().err
    assert "rdzv_common.handler] round 3 complete" in err and "hidden" not in err
    assert err.startswith("I"), err  # the level letter, as torch's lines start


def test_loglevel_sets_the_level_and_a_bad_one_falls_back_to_info(bare_logging, monkeypatch):
    no_root_handlers(monkeypatch)
    show_package_logs({"LOGLEVEL": "debug"})
    assert all(logging.getLogger(n).level == logging.DEBUG for n in PACKAGE_LOGGERS)
    for name in PACKAGE_LOGGERS:
        logging.getLogger(name).handlers = []
    show_package_logs({"LOGLEVEL": "chatty"})
    assert all(logging.getLogger(n).level == logging.INFO for n in PACKAGE_LOGGERS)


def test_a_second_call_adds_no_second_handler(bare_logging, monkeypatch):
    no_root_handlers(monkeypatch)
    show_package_logs({})
    show_package_logs({})
    assert all(len(logging.getLogger(n).handlers) == 1 for n in PACKAGE_LOGGERS)


def test_a_process_that_configured_logging_is_left_alone(bare_logging, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    show_package_logs({})
    assert all(logging.getLogger(n).handlers == [] for n in PACKAGE_LOGGERS)
    assert all(logging.getLogger(n).level == logging.NOTSET for n in PACKAGE_LOGGERS)
