"""Worker run by torchrun in the integration tests: one gloo all_reduce, results as JSON.

Environment: RESULT_DIR (where to write), EXPECT_WORLD (the world size that finishes the job).
A worker in a smaller or larger world keeps reducing until torchrun restarts it (scale-up) or a
peer dies (node loss), and fails after WORKER_PATIENCE seconds so nothing hangs. The worker of rank
FAIL_FIRST_RUN_RANK exits with an error in its first run (restart 0), as a crashing trainer does.
"""

import json
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    expect = int(os.environ.get("EXPECT_WORLD", world))
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if restart == 0 and os.environ.get("FAIL_FIRST_RUN_RANK") == str(rank):
        raise SystemExit(f"rank {rank} fails its first run (FAIL_FIRST_RUN_RANK)")
    give_up = time.monotonic() + float(os.environ.get("WORKER_PATIENCE", "90"))
    marker = os.path.join(os.environ["RESULT_DIR"], f"started-rank{rank}-restart{restart}-pid{os.getpid()}.json")
    with open(marker, "w") as f:
        json.dump({"rank": rank, "world_size": world, "restart": restart}, f)
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    while world != expect:
        if time.monotonic() > give_up:
            raise SystemExit(f"world size {world} never became {expect}")
        time.sleep(0.2)
        dist.all_reduce(torch.ones(1))
    result = {
        "rank": rank,
        "world_size": world,
        "sum": value.item(),
        "restart": restart,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    }
    path = os.path.join(os.environ["RESULT_DIR"], f"rank{rank}-restart{restart}-pid{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
