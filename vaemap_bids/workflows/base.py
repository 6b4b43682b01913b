"""The top of the graph: one sub-workflow per DWI series, run by a Nipype plugin."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing as mp
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from nipype.pipeline import engine as pe
from nipype.pipeline.plugins.multiproc import MultiProcPlugin as _NipypeMultiProc

from ..config import Config
from ..dataset.bids import SeriesPlan
from .series import init_series_wf

log = logging.getLogger("vaemap.workflow")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def init_vaemap_wf(config: Config, plans: list[SeriesPlan]) -> pe.Workflow:
    """``vaemap_wf`` with one :func:`init_series_wf` per series, based in the work dir."""
    wf = pe.Workflow(name="vaemap_wf", base_dir=str(Path(config.work_dir).resolve()))
    from ..qsm.inputs import QsmPlan
    from .qsm import init_qsm_wf
    for plan in plans:
        wf.add_nodes([init_qsm_wf(plan, config) if isinstance(plan, QsmPlan)
                      else init_series_wf(plan, config)])
    return wf


def configure_nipype(config: Config, resource_monitor: bool = False) -> None:
    """Nipype's global settings for this run: crash files in ``OUTPUT_DIR/logs``, no telemetry."""
    from nipype import config as ncfg
    from nipype import logging as nlogging

    crash_dir = Path(config.output_dir).resolve() / "logs"
    crash_dir.mkdir(parents=True, exist_ok=True)
    ncfg.update_config({
        "execution": {"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                      "stop_on_first_crash": False, "remove_unnecessary_outputs": False,
                      "check_version": False, "create_report": True,
                      "parameterize_dirs": False, "poll_sleep_duration": 0.2},
        "logging": {"log_to_file": False,
                    # Nipype prints node tracebacks at ERROR; the CLI reports failures in one line
                    "workflow_level": "INFO" if config.verbosity > 0 else "CRITICAL",
                    "interface_level": "INFO" if config.verbosity > 1 else "WARNING",
                    "utils_level": "WARNING"},
        "monitoring": {"enabled": bool(resource_monitor), "sample_frequency": "0.5",
                       "summary_append": False},
    })
    if resource_monitor:
        ncfg.enable_resource_monitor()
    nlogging.update_logging(ncfg)


def init_worker(cwd: str, parent: int) -> None:
    """MultiProc worker initializer: Nipype's own; one thread for every node (a fit node raises
    its own to the CPUs it asked for, so the nodes running at once never use more threads than
    ``--nprocs``); and the kernel ends this worker when the vaemap process that started it dies
    (even by SIGKILL), so no worker outlives a killed run."""
    from nipype.pipeline.plugins.multiproc import process_initializer
    from threadpoolctl import threadpool_limits
    process_initializer(cwd)
    threadpool_limits(1)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    # a forked worker inherits the CLI's SIGTERM handler, which turns the signal into an
    # exception that the pool would catch and survive: workers simply end on SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the workers end when their pool is shut
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class MultiProcPlugin(_NipypeMultiProc):
    """Nipype's MultiProc whose workers keep to the thread budget and die with the vaemap
    process (see :func:`init_worker`)."""

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self.pool.shutdown(wait=False)  # no worker has started yet: replace the pool
        self.pool = ProcessPoolExecutor(
            max_workers=self.processors, initializer=init_worker,
            initargs=(self._cwd, os.getpid()),
            mp_context=mp.get_context(self.plugin_args.get("mp_context")))


def run_vaemap_wf(wf: pe.Workflow, config: Config, status_callback=None):
    """Run the graph with the configured plugin; returns Nipype's execution graph.
    ``status_callback(node, status)`` is Nipype's per-node hook ("start", "end", "exception")."""
    args = config.nipype_plugin_args()
    log.info("running %s with %s %s", wf.name, config.plugin, args)
    if status_callback is not None:
        args["status_callback"] = status_callback
    plugin = MultiProcPlugin(plugin_args=args) if config.plugin == "MultiProc" else config.plugin
    return wf.run(plugin=plugin, plugin_args=args)
