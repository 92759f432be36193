"""The torchrun side of training: process group set-up, every rank's RNG states, end-of-run weight check."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import store

log = logging.getLogger(__name__)


# How long a rank waits in a collective. Rank 0 evaluates alone while the others wait in the next one (the
# step's SIGTERM flag, `train_loop._agreed`): NCCL's default of 10 minutes would end a run whose evaluation takes
# longer (a large --eval-samples, a VAE decode). A rank that dies still ends the run: torchrun sends the others
# SIGTERM, which a rank waiting in a collective cannot act on, then SIGKILL after its --shutdown-timeout (30 s).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)


def setup(device: str) -> tuple[int, int, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:  # each rank its own GPU (LOCAL_RANK), chosen before NCCL starts so that it binds to that one
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))  # torchrun sets LOCAL_RANK
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        dist.init_process_group(backend="nccl", device_id=torch.device(device), timeout=COLLECTIVE_TIMEOUT)
    else:
        dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), world, device


def mean_over_ranks(value: float, world: int, device: str = "cpu") -> float:
    """``value`` averaged over every rank (each calls this at the same step); itself on one process."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


def every_ranks(value, world: int) -> list:
    """``value`` as each rank has it, by rank (every rank calls this at the same point)."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def gather_rng_states(gen: torch.Generator, world: int, device: str = "cpu") -> tuple[list, list, list]:
    """Every rank's RNG states, so that a resume restores each rank's own stream of noise: the loop's generator,
    torch's CPU state and, on CUDA, the device's default generator (dropout draws from it there)."""
    cuda = torch.cuda.get_rng_state(device) if device.startswith("cuda") else None
    mine = [gen.get_state(), torch.get_rng_state(), cuda]
    if world == 1:
        return [mine[0]], [mine[1]], [mine[2]]
    allst = [None] * world
    dist.all_gather_object(allst, mine)
    return [s[0] for s in allst], [s[1] for s in allst], [s[2] for s in allst]


def record_weight_digests(model: torch.nn.Module, rank: int, world: int, out: Path) -> None:
    """Every rank's weight checksum in ``weights_by_rank.json``: DDP ranks must end identical."""
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.detach().float().cpu().numpy().tobytes())
    digests = [h.hexdigest()]
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, h.hexdigest())
    if rank == 0:
        store.write_json(out / "weights_by_rank.json", digests)
        if len(set(digests)) > 1:
            log.error("ranks ended with different weights: %s", digests)
