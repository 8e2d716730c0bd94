"""Worker run by torchrun in the recovery tests: it "trains" without any collective until the test
writes RESULT_DIR/stop, so no worker failure ever tells its agent that a peer died; only the
agent's monitor loop (``num_nodes_waiting()``) can restart it. It records where it started.

Environment: RESULT_DIR, AGENT (the test's name for this worker's agent), WORKER_PATIENCE.
"""

import json
import os
import time


def main() -> None:
    env = os.environ
    started = {
        "agent": env["AGENT"],
        "rank": int(env["RANK"]),
        "group_rank": int(env["GROUP_RANK"]),
        "world_size": int(env["WORLD_SIZE"]),
        "group_world_size": int(env["GROUP_WORLD_SIZE"]),
        "restart": int(env["TORCHELASTIC_RESTART_COUNT"]),
        "master": f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
        "pid": os.getpid(),
        "t": time.time(),
    }
    result_dir = env["RESULT_DIR"]
    with open(os.path.join(result_dir, f"started-{env['AGENT']}-pid{os.getpid()}.json"), "w") as f:
        json.dump(started, f)
    give_up = time.monotonic() + float(env.get("WORKER_PATIENCE", "120"))
    while not os.path.exists(os.path.join(result_dir, "stop")):
        if time.monotonic() > give_up:
            raise SystemExit("never told to stop")
        time.sleep(0.2)


if __name__ == "__main__":
    main()
