"""A process that exits without shutdown() (torchrun skips it on SIGTERM) leaves at once."""

import json
import subprocess
import sys
import textwrap
import time

from etcd_rdzv.factory import create_backend

AGENT = textwrap.dedent(
    """
    import json, sys
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from rdzv_common import create_handler
    from etcd_rdzv.factory import create_backend

    params = RendezvousParameters(
        "etcd_rdzv", sys.argv[1], sys.argv[2], 1, 1, local_addr="127.0.0.1",
        key_prefix=sys.argv[3], keep_alive_interval=5, keep_alive_max_attempt=3,
    )
    backend, store = create_backend(params, name="etcd_rdzv")
    handler = create_handler(store, backend, params)
    info = handler.next_rendezvous()
    print(json.dumps({"node": handler.node.key, "rank": info.rank}), flush=True)
    # exits here without shutdown()
    """
)


def test_exit_without_shutdown_ends_liveness_before_its_ttl(etcd_run):
    done = subprocess.run(
        [sys.executable, "-c", AGENT, etcd_run.endpoint, etcd_run.run_id, etcd_run.key_prefix],
        capture_output=True, text=True, timeout=120,
    )
    exited = time.monotonic()
    assert done.returncode == 0, done.stderr[-3000:]
    node = json.loads(done.stdout.strip().splitlines()[-1])["node"]
    backend, _ = create_backend(etcd_run.params(), name="etcd_rdzv")
    try:
        # The liveness TTL is 15 s; the key must already be gone, long before that.
        assert backend.liveness.alive([node], 15) == set()
        assert time.monotonic() - exited < 5
        state = backend.get_state()
        assert state is not None and not json.loads(state[0])["closed"]
    finally:
        backend.close()
