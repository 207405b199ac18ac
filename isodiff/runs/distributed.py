"""Multi-GPU jobs on SLURM: one task per GPU, torch's distributed environment from SLURM's.

A SLURM job that asks for `tasks_per_node = gpus_per_node` runs one process per GPU (srun
starts them; submitit runs the same job function in each). Before anything builds an
`accelerate.Accelerator`, each process calls `export_torch_distributed_env()`, which turns
SLURM's variables into the ones torch's `env://` rendezvous and accelerate read:

    SLURM_PROCID            -> RANK
    SLURM_STEP_NUM_TASKS    -> WORLD_SIZE
    SLURM_LOCALID           -> LOCAL_RANK        (accelerate picks cuda:LOCAL_RANK)
    SLURM_STEP_TASKS_PER_NODE, SLURM_NODEID -> LOCAL_WORLD_SIZE
    SLURM_STEP_NODELIST     -> MASTER_ADDR       (first node; 127.0.0.1 on one node)
    SLURM_JOB_ID            -> MASTER_PORT       (20000 + id % 20000: every rank agrees)

Why not one task running `accelerate launch`: SLURM then sees one process, so signals,
requeue and accounting miss the workers, and a nested launcher must be configured per
cluster; with one task per GPU the same code runs under srun, submitit and torchrun.

On nodes without CUDA it also sets ACCELERATE_USE_CPU=true, so that the processes form
one gloo group (accelerate otherwise treats each CPU process as a lone job).

It does nothing outside a job step (no SLURM_STEP_NUM_TASKS: a plain batch script or a
laptop), for a single task, or when a launcher (torchrun, accelerate launch) already set
RANK/WORLD_SIZE. `python -m isodiff.runs.distributed` (under `srun -n 2`, or torchrun) prints
the mapping and checks a gloo all-reduce across the processes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, MutableMapping

PORT_BASE, PORT_SPAN = 20000, 20000
TORCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-004,7],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return f"{prefix}{first}{suffix or ''}"


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM's compressed list: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"cannot read SLURM tasks per node {tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id]


def torch_distributed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch's distributed variables for this SLURM task; {} when there is nothing to do."""
    world = environ.get("SLURM_STEP_NUM_TASKS")
    if world is None or int(world) <= 1 or "WORLD_SIZE" in environ or "RANK" in environ:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    num_nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    # On one node the loopback always works, whatever the host's DNS says.
    master = "127.0.0.1" if num_nodes == 1 else first_host(nodelist)
    node_id = int(environ.get("SLURM_NODEID", 0))
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    local_world = tasks_on_node(per_node, node_id) if per_node else int(world)
    port = environ.get("MASTER_PORT") or str(PORT_BASE + int(environ["SLURM_JOB_ID"]) % PORT_SPAN)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": world,
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or master,
        "MASTER_PORT": port,
    }


def export_torch_distributed_env(
    environ: MutableMapping[str, str] | None = None,
    *,
    cuda: bool | None = None,
) -> dict[str, str]:
    """Set torch's distributed variables from SLURM's in `environ` (default: os.environ).

    Call it at the start of a job, before an Accelerator exists. Returns what it set.
    Without CUDA (`cuda` None: ask torch) it also sets ACCELERATE_USE_CPU, because
    accelerate runs several CPU processes as one gloo group only when told to use the CPU;
    otherwise each would train alone.
    """
    environ = os.environ if environ is None else environ
    values = torch_distributed_env(environ)
    if values:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if not cuda:
            values["ACCELERATE_USE_CPU"] = "true"
    environ.update(values)
    return values


def rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank (0 outside distributed jobs): only rank 0 writes files.
    torch's RANK, else SLURM's task id where SLURM started several tasks (before
    export_torch_distributed_env has run, or in a command that never runs it)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return int(environ["RANK"])
    several = int(environ.get("SLURM_STEP_NUM_TASKS") or 1) > 1
    return int(environ.get("SLURM_PROCID", 0)) if several else 0


def allreduce_check() -> dict[str, int | str]:
    """Export the environment, build a CPU Accelerator and all-reduce rank+1 over gloo.

    Lives in the package so that submitit can unpickle it inside a job.
    """
    import torch
    from accelerate import Accelerator

    export_torch_distributed_env()
    accelerator = Accelerator(cpu=True)
    value = torch.tensor([float(accelerator.process_index + 1)])
    total = accelerator.reduce(value, reduction="sum")
    result = {
        "rank": accelerator.process_index,
        "local_rank": accelerator.local_process_index,
        "num_processes": accelerator.num_processes,
        "sum": int(total.item()),
        "backend": str(accelerator.state.backend),
        **{k: os.environ.get(k, "") for k in TORCH_KEYS},
    }
    accelerator.end_training()  # destroys the process group
    return result


if __name__ == "__main__":
    print(json.dumps(allreduce_check(), sort_keys=True), flush=True)
