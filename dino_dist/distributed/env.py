"""Who am I in the job: rank, world size and device from the launcher's environment, and the
process group's start and end.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a SLURM task without torchrun
has SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (and its rendezvous from `slurm_env`); a plain
process is rank 0 of 1 and needs no process group.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dino_dist.errors import ConfigError
from dino_dist.distributed.slurm_env import slurm_rendezvous


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    # Who does what, for the whole code base:
    #   once per job (is_main, global rank 0): log.txt, console, metrics.jsonl, TensorBoard,
    #     config.yaml, checkpoints (write, prune, clean-up of interrupted writes), the k-NN
    #     report, the SLURM requeue;
    #   once per node (is_local_main, local rank 0): node-local files every rank of the node
    #     reads: the demo images and other dataset caches (each node has its own disk);
    #   every rank: its data shard, forward/backward, its part of each reduction, reading
    #     checkpoints.
    # A node's local rank 0 is not the job's rank 0 on any node but the first: writing job
    # files under is_local_main would make every node write them.

    @property
    def is_main(self) -> bool:
        """Global rank 0: the once-per-job work listed above."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """First process on its node: the once-per-node work listed above."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def read_launch_env() -> tuple[int, int, int]:
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return rank, world, local


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for (train.device or --device), but no CUDA "
                          "device is visible: use cpu or auto")
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def use_slurm_rendezvous() -> None:
    """Under srun without torchrun, fill MASTER_ADDR/MASTER_PORT from the job itself.

    Every task derives the same first node and job-id port, so no shared init file is
    needed, and a requeued job (same id, maybe other nodes) derives them afresh. Values the
    user exported win.
    """
    found = slurm_rendezvous() if "MASTER_PORT" not in os.environ else None
    if found:
        os.environ.setdefault("MASTER_ADDR", found[0])
        os.environ["MASTER_PORT"] = str(found[1])


def init_distributed(device_preference: str = "auto", timeout_s: int = 1800) -> DistEnv:
    rank, world, local = read_launch_env()
    device = pick_device(device_preference, local)
    if world > 1 and not dist.is_initialized():
        use_slurm_rendezvous()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: "
                               "start the job with torchrun or set MASTER_ADDR/MASTER_PORT")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                store=restart_scoped_store(rank, world, timeout),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def restart_scoped_store(rank: int, world: int, timeout: datetime.timedelta):
    """Under torchrun, a store whose keys are private to this restart round; else None.

    With static rendezvous torchrun keeps one store across `--max-restarts` rounds, and the
    process group's keys (each rank's gloo address) would still hold the dead round's values:
    a restarted rank could read them and try to connect to a process that no longer exists.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts_store, timeout=timeout)
    return dist.PrefixStore(f"dino_dist/restart_{restart}", store)


def teardown() -> None:
    # Free the models (FSDP modules and device meshes hold process groups in reference cycles)
    # while the interpreter is fully alive: left to interpreter finalisation, destroying them
    # was seen to abort or crash a rank after a successful run.
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def configure_cpu_threads(env: DistEnv, loader_workers: int) -> int:
    """Intra-op threads for CPU training that leave one core to each data-loader worker.

    On a small machine, torch's default (all cores) fights the loader workers for the same
    cores and the step gets slower than with fewer threads. OMP_NUM_THREADS, when set (torchrun
    sets 1), is respected as is.
    """
    if env.device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local_procs = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(local_procs, 1) - loader_workers)
    torch.set_num_threads(threads)
    return threads
