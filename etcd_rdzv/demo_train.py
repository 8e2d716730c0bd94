"""The demo's trainer: a tiny linear model fitted with gloo under torchrun.

Environment (all optional): ``DEMO_STEPS`` (default 5) steps, then exit; with ``DEMO_STOP_FILE``
it trains instead until that file exists (every rank stops at the same step).
``DEMO_STEP_SECONDS`` paces the steps. ``DEMO_CHECKPOINT``: rank 0 saves the model and step there
after each step and every restart resumes from it, so a group that re-forms keeps training where
it stopped.
"""

import ctypes
import os
import signal
import time

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1


def die_with_the_agent() -> None:
    # A machine that fails takes its workers with it; the demo SIGKILLs only the agent, so its
    # workers must not outlive it (torchrun starts them in sessions of their own).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)


def load(path: str | None, model: torch.nn.Module) -> int:
    """The step to start from: one after the checkpoint's, whose weights ``model`` takes."""
    if not path or not os.path.exists(path):
        return 1
    saved = torch.load(path)
    model.load_state_dict(saved["model"])
    return saved["step"] + 1


def save(path: str | None, model: torch.nn.Module, step: int) -> None:
    if path:
        torch.save({"model": model.state_dict(), "step": step}, path + ".tmp")
        os.replace(path + ".tmp", path)  # a reader never sees half a checkpoint


def main() -> None:
    die_with_the_agent()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    steps = int(os.environ.get("DEMO_STEPS", "5"))
    pace = float(os.environ.get("DEMO_STEP_SECONDS", "0"))
    stop_file, checkpoint = os.environ.get("DEMO_STOP_FILE"), os.environ.get("DEMO_CHECKPOINT")
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    step = load(checkpoint, module)
    model = torch.nn.parallel.DistributedDataParallel(module)  # takes rank 0's weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    true_w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    generator = torch.Generator().manual_seed(rank)
    print(
        f"[rank {rank}/{world}] rendezvous formed: group rank {os.environ['GROUP_RANK']}, "
        f"trainer store {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, "
        f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']}, from step {step}",
        flush=True,
    )
    while True:
        if stop_file:
            stop = torch.tensor([float(os.path.exists(stop_file))])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item():
                break
        elif step > steps:
            break
        x = torch.randn(32, 4, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), x @ true_w.T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"[rank {rank}/{world}] step {step} loss {loss.item():.4f}", flush=True)
        if rank == 0:
            save(checkpoint, module, step)
        step += 1
        time.sleep(pace)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
