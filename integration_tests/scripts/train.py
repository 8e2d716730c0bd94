"""Worker run by torchrun in the integration tests: "trains" for TRAIN_SECONDS, one gloo
all_reduce every 0.2 s, then writes its result as JSON to RESULT_DIR.

Every rank takes the same number of steps, so the group ends together; a step that fails (a peer
gone) fails the worker, as a trainer's collective would.
"""

import json
import os
import time

import torch
import torch.distributed as dist

STEP_SECONDS = 0.2


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    marker = os.path.join(os.environ["RESULT_DIR"], f"started-rank{rank}-restart{restart}-pid{os.getpid()}.json")
    with open(marker, "w") as f:
        json.dump({"rank": rank, "world_size": world, "restart": restart}, f)
    steps = int(float(os.environ.get("TRAIN_SECONDS", "10")) / STEP_SECONDS)
    total = torch.zeros(1)
    for _ in range(steps):
        value = torch.ones(1)
        dist.all_reduce(value)
        total += value
        time.sleep(STEP_SECONDS)
    result = {"rank": rank, "world_size": world, "restart": restart, "steps": steps, "sum": total.item()}
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{rank}-restart{restart}-pid{os.getpid()}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
