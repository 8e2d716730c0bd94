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
