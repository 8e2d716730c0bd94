"""The demo's trainer: a tiny linear model fitted for a few steps with gloo, under torchrun."""

import os

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    true_w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    generator = torch.Generator().manual_seed(rank)
    print(
        f"[rank {rank}/{world}] rendezvous formed: group rank {os.environ['GROUP_RANK']}, "
        f"trainer store {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, "
        f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']}",
        flush=True,
    )
    for step in range(1, 6):
        x = torch.randn(32, 4, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), x @ true_w.T)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"[rank {rank}/{world}] step {step} loss {loss.item():.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
