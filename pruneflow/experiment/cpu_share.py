"""What a run takes from the Hydra launcher that started it: its share of the machine's CPU cores.

``hydra/launcher=joblib`` runs ``n_jobs`` runs at once in worker processes on one machine. Each
PyTorch process would otherwise start one thread per core, so ``n_jobs`` jobs would run
``n_jobs × cores`` threads on ``cores`` cores and spend their time switching. Each job therefore
takes ``cores // n_jobs`` threads (at least one). joblib's process workers export that number as
``OMP_NUM_THREADS`` (keeping a value the user set), and it is what this job uses; setting it here
makes the split hold whatever the backend, and says so in the run's log. Other launchers (the
default one, which runs jobs one after another, and Slurm's, which gives each job its own
allocation) are left alone.
"""

from __future__ import annotations

import logging
import os

import torch
from hydra.core.hydra_config import HydraConfig

log = logging.getLogger(__name__)

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def parallel_jobs(n_jobs: int | None, cores: int) -> int:
    """How many jobs joblib runs at once for its ``n_jobs`` (-1: one per core, -2: all cores but one, ...)."""
    if n_jobs is None or n_jobs == 0:
        return 1
    if n_jobs < 0:
        return max(cores + 1 + n_jobs, 1)
    return n_jobs


def threads_per_job(n_jobs: int | None, cores: int) -> int:
    """Each of the parallel jobs' share of ``cores``, at least one thread."""
    return max(1, cores // parallel_jobs(n_jobs, cores))


def exported_threads() -> int | None:
    """The thread count in ``OMP_NUM_THREADS`` (set by joblib's workers, or by the user), if any."""
    exported = os.environ.get("OMP_NUM_THREADS", "")
    return int(exported) if exported.isdigit() and int(exported) > 0 else None


def share_cpu_cores() -> int | None:
    """Under the joblib launcher, limit this job's PyTorch threads to its share of the cores; returns
    the thread count set, or None where nothing was changed."""
    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    if launcher.get("_target_") != JOBLIB_LAUNCHER:
        return None
    from joblib import cpu_count  # installed with the launcher; counts the cores this process may use

    cores = cpu_count()
    threads = exported_threads() or threads_per_job(launcher.get("n_jobs"), cores)
    torch.set_num_threads(threads)
    log.info("joblib launcher with n_jobs=%s on %d cores: %d CPU threads for this job",
             launcher.get("n_jobs"), cores, threads)  # fmt: skip
    return threads
