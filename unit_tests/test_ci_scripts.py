"""The CI scripts under .ci/, run against stand-in apt-get, dpkg and etcd programs."""

import os
import stat
import subprocess
from pathlib import Path

GET_ETCD34 = Path(__file__).resolve().parent.parent / ".ci" / "get-etcd34"

# etcd --version prints several lines; a pause between them lets a reader that stops after the
# first close the pipe before the rest is written, as happens at random on a busy CI machine.
FAKE_ETCD = """#!/usr/bin/env bash
echo "etcd Version: 3.4.23"
sleep 0.3
echo "Git SHA: Not provided (use ./build instead of go build)"
echo "Go Version: go1.19.8"
"""


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_debian(bin_dir: Path) -> None:
    _script(bin_dir / "apt-get", '#!/usr/bin/env bash\ntouch etcd-server.deb etcd-client.deb\n')
    # dpkg -x DEB DIR: both packages' programs land in DIR/usr/bin.
    _script(
        bin_dir / "dpkg",
        "#!/usr/bin/env bash\n"
        'mkdir -p "$3/usr/bin"\n'
        f"cat > \"$3/usr/bin/etcd\" <<'FAKE'\n{FAKE_ETCD}FAKE\n"
        'printf "#!/bin/sh\\n" > "$3/usr/bin/etcdctl"\n'
        'chmod +x "$3/usr/bin/etcd" "$3/usr/bin/etcdctl"\n',
    )


def test_get_etcd34_reports_the_version_of_a_server_that_writes_it_slowly(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_debian(bin_dir)
    dest = tmp_path / "etcd-3.4"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(GET_ETCD34), str(dest)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "etcd Version: 3.4.23" in done.stdout
    assert os.access(dest / "etcd", os.X_OK) and os.access(dest / "etcdctl", os.X_OK)


START_DOCKER = GET_ETCD34.parent / "start-docker"

# Stand-ins: `docker info` answers once the fake engine has started (it leaves a marker), the fake
# engine runs until killed, and apt-get "installs" the engine into the stand-ins' directory.
FAKE_DOCKER = '#!/usr/bin/env bash\n[ "$1" = info ] && [ -f "$FAKE_STATE/engine-up" ]\n'
FAKE_DOCKERD = '#!/usr/bin/env bash\ntouch "$FAKE_STATE/engine-up"\nexec sleep 60\n'


def _docker_env(tmp_path: Path, *, root: bool = True, dockerd: str | None = FAKE_DOCKERD, apt: bool = True) -> dict:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    state.mkdir()
    _script(bin_dir / "docker", FAKE_DOCKER)
    _script(bin_dir / "id", f'#!/usr/bin/env bash\necho {0 if root else 1000}\n')
    if dockerd is not None and not apt:
        _script(bin_dir / "dockerd", dockerd)
    if apt:
        body = "" if dockerd is None else f"cat > {bin_dir}/dockerd <<'FAKE'\n{dockerd}FAKE\nchmod +x {bin_dir}/dockerd\n"
        _script(bin_dir / "apt-get", f'#!/usr/bin/env bash\necho "$*" >> "$FAKE_STATE/apt-get.log"\n[ "$1" = install ] || exit 0\n{body}')
    # Only the stand-ins and the basic tools: no real docker, dockerd or apt-get of this machine.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "cat", "chmod", "kill", "rm", "seq", "setsid", "sleep", "tail", "timeout", "touch"):
        real = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if real.startswith("/"):
            (tools / tool).symlink_to(real)
    return {"PATH": f"{bin_dir}{os.pathsep}{tools}", "FAKE_STATE": str(state), "HOME": str(tmp_path)}


def _start_docker(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(START_DOCKER), str(tmp_path / "dockerd.pid")], env=env, capture_output=True, text=True, timeout=90
    )


def _stop(tmp_path: Path) -> None:
    pidfile = tmp_path / "dockerd.pid"
    if pidfile.exists():
        os.kill(int(pidfile.read_text()), 15)


def test_start_docker_installs_and_starts_an_engine_when_none_answers(tmp_path):
    env = _docker_env(tmp_path)
    try:
        done = _start_docker(tmp_path, env)
        assert done.returncode == 0, done.stderr
        assert "install -y -q --no-install-recommends docker.io" in (tmp_path / "state" / "apt-get.log").read_text()
        assert "started dockerd" in done.stdout
        pid = int((tmp_path / "dockerd.pid").read_text())
        os.kill(pid, 0)  # it runs on after the script
    finally:
        _stop(tmp_path)


def test_start_docker_leaves_an_engine_that_answers_alone(tmp_path):
    env = _docker_env(tmp_path)
    (tmp_path / "state" / "engine-up").touch()
    done = _start_docker(tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "state" / "apt-get.log").exists()
    assert not (tmp_path / "dockerd.pid").exists()


def test_start_docker_says_why_it_cannot_when_not_root(tmp_path):
    done = _start_docker(tmp_path, _docker_env(tmp_path, root=False))
    assert done.returncode == 3
    assert "only root can install or start one" in done.stderr


def test_start_docker_says_why_when_the_engine_does_not_come_up(tmp_path):
    env = _docker_env(tmp_path, dockerd='#!/usr/bin/env bash\necho "failed to start daemon: no cgroups"\nexit 1\n', apt=False)
    done = _start_docker(tmp_path, env)
    assert done.returncode == 3
    assert "did not answer" in done.stderr and "no cgroups" in done.stderr
    assert not (tmp_path / "dockerd.pid").exists()
