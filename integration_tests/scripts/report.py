"""Worker run by torchrun in the rank-order and admission tests: reports where its node landed.

Each worker writes ``started-<tag>-restart<r>-pid<p>.json`` with its node's rendezvous rank
(GROUP_RANK), the world size, its agent's NODE_TAG and TORCH_RDZV_TOPOLOGY, then keeps the group
busy with all_reduce until RESULT_DIR/release exists for any of them (exit 0) or a peer dies (the all_reduce fails
and torchrun re-rendezvous). It gives up after WORKER_PATIENCE seconds so nothing hangs.
"""

import json
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    result_dir = os.environ["RESULT_DIR"]
    tag, restart = os.environ.get("NODE_TAG", "node"), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    report = {
        "tag": tag,
        "group_rank": int(os.environ["GROUP_RANK"]),
        "world_size": dist.get_world_size(),
        "restart": restart,
        "topology": os.environ.get("TORCH_RDZV_TOPOLOGY"),
        "t": time.time(),
    }
    with open(os.path.join(result_dir, f"started-{tag}-restart{restart}-pid{os.getpid()}.json"), "w") as f:
        json.dump(report, f)
    give_up = time.monotonic() + float(os.environ.get("WORKER_PATIENCE", "90"))
    while True:
        # Every worker leaves in the same iteration: the release is summed over the group.
        released = torch.tensor([float(os.path.exists(os.path.join(result_dir, "release")))])
        dist.all_reduce(released)
        if released.item() > 0:
            break
        if time.monotonic() > give_up:
            raise SystemExit("never released")
        time.sleep(0.2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
