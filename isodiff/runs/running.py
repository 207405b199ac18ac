"""Whether a job whose status.json says running is still at work, and waiting for it to end.

The job records its host and pid when it starts (isodiff.train.job). On that host the pid
says whether it lives; from another host (a SLURM node) only its folder can tell: a job
writes train.log, metrics.csv and checkpoints as it trains, so one that wrote nothing for
STALE_S is taken as gone.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from isodiff.cli import command_line
from isodiff.errors import ConfigError
from isodiff.runs.status import RUNNING, read_status

log = logging.getLogger(__name__)

STALE_S = 30 * 60  # longer than a checkpoint or an evaluation of held-out L_iso takes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _last_write(run_dir: Path) -> float:
    """The newest mtime among the files a training job keeps writing."""
    paths = [run_dir / "status.json", run_dir / "train.log", run_dir / "metrics.csv"]
    paths += list((run_dir / "checkpoints").glob("step_*"))
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def live_job(run_dir: Path) -> tuple[dict, bool] | None:
    """(status, alive) when status.json says running: alive when its pid lives on this host,
    or, from another host, when its folder was written within STALE_S; None when not running."""
    status = read_status(run_dir) or {}
    if status.get("state") != RUNNING:
        return None
    pid, host = status.get("pid"), status.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        return status, _pid_alive(pid)
    return status, time.time() - _last_write(run_dir) < STALE_S


def _who(status: dict) -> str:
    """The job as status.json records it: `pid 123 on node7 started 2026-...`."""
    recorded = (("pid", "pid"), ("on", "host"), ("started", "updated"))
    who = " ".join(f"{word} {status[key]}" for word, key in recorded if status.get(key))
    return who or "no pid or host recorded"


def check_job_ended(run: str, wait: bool = False, poll_s: float = 10.0) -> None:
    """ConfigError naming run= while its job still trains (or died still marked running);
    wait: first wait for a live job to end (its state then decides, as for any run)."""
    run_dir = Path(run).expanduser()
    found = live_job(run_dir)
    if found and found[1] and wait:
        log.info("run=%s: waiting for its job (%s) to end", run, _who(found[0]))
        while (found := live_job(run_dir)) and found[1]:
            time.sleep(poll_s)
    if not found:
        return
    status, alive = found
    if alive:
        raise ConfigError(
            f"run={run!r} is still training ({_who(status)}): evaluate it when it is done, "
            f"or wait for it and then evaluate: {command_line()} wait=true"
        )
    gone = (
        "has ended without recording why (killed?)"
        if status.get("host") == socket.gethostname()
        else f"has written nothing in it for over {STALE_S // 60} minutes"
    )
    raise ConfigError(
        f"run={run!r}: status.json says running, but its job ({_who(status)}) {gone}: rerun "
        "the command that trained it, which resumes it from its newest checkpoint, then "
        "evaluate it"
    )
