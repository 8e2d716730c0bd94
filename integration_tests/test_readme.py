"""The README's examples, run as a new user runs them, so that the README cannot drift from the code.

Every fenced block of README.md follows a marker, ``<!-- readme-test: ... -->``, that names how this
file runs it or says why it is not run (``not run: ...``). The blocks are read from the README at
test time: the etcd it tells how to start is started, the library example is saved and run in two
processes at once, the torchrun command is run twice at once (two nodes), the log line it shows is
looked for in the agents' output, and the ``etcd-rdzv`` commands run against the run they left.
The one change made to the text: the README's etcd port, 2379, becomes a free port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration_tests.etcd_fixture import free_port

pytestmark = pytest.mark.timeout(420)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_PORT = "2379"
MARKER = re.compile(r"^<!-- readme-test: (.+?) -->$")
# How this file runs each block that is meant to run, by its marker.
RUN = ("etcd", "torchrun, twice at once", "output of torchrun", "library", "library runs, at once", "cli")
NOT_RUN = "not run: "


@dataclass(frozen=True)
class Block:
    marker: str
    language: str
    text: str
    line: int


def readme_blocks() -> list[Block]:
    """Every fenced block of the README with the marker before it.

    Raises:
        AssertionError: naming the line of a block without a marker.
    """
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            marker = MARKER.match(lines[i - 1]) if i else None
            assert marker, f"README.md:{i + 1}: a code block without a '<!-- readme-test: ... -->' line before it"
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(marker.group(1), lines[i][3:].strip(), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
            i = end
        i += 1
    return blocks


def block(marker: str) -> Block:
    [found] = [b for b in readme_blocks() if b.marker == marker]
    return found


def test_every_block_says_whether_and_how_it_is_run():
    blocks = readme_blocks()
    for b in blocks:
        assert b.marker in RUN or (b.marker.startswith(NOT_RUN) and len(b.marker) > len(NOT_RUN) + 10), (
            f"README.md:{b.line}: marker {b.marker!r} is neither one of {RUN} nor 'not run: <why>'"
        )
    ran = [b.marker for b in blocks if b.marker in RUN]
    assert sorted(ran) == sorted(RUN), "each way of running a block has exactly one block"


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z0-9-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"`?make ([a-z0-9-]+)", README.read_text()))
    assert named and named <= targets, named - targets


def test_every_file_the_readme_links_exists():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert links and not missing, missing


def test_the_version_is_the_changelogs_latest_release():
    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    releases = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases[0] == version, (version, releases)
    # The releases the README speaks of are the changelog's.
    named = set(re.findall(r"(?<![\d.])0\.\d+\.\d+(?![\d.])", README.read_text()))  # not in an IP address
    assert named and named <= set(releases), named


def _environment() -> dict[str, str]:
    """A new user's shell with the package's environment active: its bin first on PATH, no
    ``ETCD_RDZV_*`` or ``LOGLEVEL`` of the test run's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_RDZV_") and k != "LOGLEVEL"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _shell(text: str, cwd: Path, env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "-e", "-c", text], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, **popen,
    )


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process; return their outputs, each asserted to have exited 0."""
    deadline = time.monotonic() + timeout
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise AssertionError(f"still running after {timeout:g}s:\n{out[-4000:]}") from None
        assert proc.returncode == 0, out[-6000:]
        outputs.append(out)
    return outputs


@pytest.fixture
def readme_etcd(tmp_path) -> Iterator[tuple[str, dict[str, str]]]:
    """The README's etcd, started with its own block on a free port; ``(port, env)``. Stopped with
    Ctrl-C (SIGINT) afterwards, which must delete its data."""
    port = str(free_port())
    env = _environment()
    # SIGINT as a terminal delivers it: a test runner may have left it ignored for its children.
    etcd = _shell(block("etcd").text.replace(README_PORT, port), tmp_path, env,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = etcd.stdout.readline()
        assert f"serves clients at 127.0.0.1:{port}" in first, first + etcd.stdout.read()
        data = Path(re.search(r"data in (\S+)\)", first).group(1))
        assert data.is_dir()
        yield port, env
        os.killpg(etcd.pid, signal.SIGINT)
        out, _ = etcd.communicate(timeout=30)
        assert etcd.returncode == 0 and "etcd stopped and its data directory removed." in out, out
        assert not data.exists()
    finally:
        if etcd.poll() is None:
            os.killpg(etcd.pid, signal.SIGKILL)
            etcd.wait()


def test_the_readme_examples_run_as_written(readme_etcd, tmp_path):
    port, env = readme_etcd

    def text(marker: str) -> str:
        return block(marker).text.replace(README_PORT, port)

    # The library example, saved as the README says, in two processes at once.
    (tmp_path / "rendezvous.py").write_text(text("library"))
    commands = [line for line in text("library runs, at once").splitlines() if line.strip()]
    assert len(commands) == 2
    outputs = _finish([_shell(c, tmp_path, env) for c in commands], timeout=120)
    ranks = sorted(re.search(r"^rank (\d) of 2, trainers' store at 127\.0\.0\.1:\d+$", out, re.M).group(1) for out in outputs)
    assert ranks == ["0", "1"], outputs
    assert all("RendezvousTimings(round=0" in out for out in outputs), outputs

    # The torchrun command, as two nodes, at torchrun's default log level.
    command = text("torchrun, twice at once")
    outputs = _finish([_shell(command, tmp_path, env), _shell(command, tmp_path, env)], timeout=240)
    agents = "\n".join(outputs)
    assert "[rank 0/2] step 5 " in agents and "[rank 1/2] step 5 " in agents, agents[-4000:]
    # The log line the README shows is the one the agents print (numbers aside).
    [shown] = block("output of torchrun").text.strip().splitlines()
    pattern = re.sub(r"\d+", lambda _: r"\d+", re.escape(shown))
    assert all(len(re.findall(pattern, out)) == 1 for out in outputs), (pattern, agents[-4000:])

    # The operator commands, against the run those agents left.
    [out] = _finish([_shell(text("cli"), tmp_path, env)], timeout=180)
    assert re.search(r"^RUN +ROUND +STATE +OPEN +PARTICIPANTS +ALIVE +REVISION$", out, re.M), out
    assert re.search(r"^my-job +0 +complete +closed +2 +0 ", out, re.M), out
    assert "host 10.0.0.7 quarantined in run 'my-job'" in out and "with --now" in out, out
    assert "deleted run 'my-job'" in out, out
