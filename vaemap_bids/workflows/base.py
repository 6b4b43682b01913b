"""The top of the graph: one sub-workflow per DWI series, run by a Nipype plugin."""
from __future__ import annotations

import logging
from pathlib import Path

from nipype.pipeline import engine as pe

from ..config import Config
from ..dataset.bids import SeriesPlan
from .series import init_series_wf

log = logging.getLogger("vaemap.workflow")


def init_vaemap_wf(config: Config, plans: list[SeriesPlan]) -> pe.Workflow:
    """``vaemap_wf`` with one :func:`init_series_wf` per series, based in the work dir."""
    wf = pe.Workflow(name="vaemap_wf", base_dir=str(Path(config.work_dir).resolve()))
    for plan in plans:
        wf.add_nodes([init_series_wf(plan, config)])
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


def run_vaemap_wf(wf: pe.Workflow, config: Config, status_callback=None):
    """Run the graph with the configured plugin; returns Nipype's execution graph.
    ``status_callback(node, status)`` is Nipype's per-node hook ("start", "end", "exception")."""
    args = config.nipype_plugin_args()
    log.info("running %s with %s %s", wf.name, config.plugin, args)
    if status_callback is not None:
        args["status_callback"] = status_callback
    return wf.run(plugin=config.plugin, plugin_args=args)
