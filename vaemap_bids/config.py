"""One settings object for a run, written as TOML into the work dir (to resume and to audit).

Only ``vaemap_bids.cli`` and this module read the command line or the environment; everything
else receives a :class:`Config` (or plain values taken from it).
"""
from __future__ import annotations

import os
import uuid
from enum import IntEnum
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from . import __version__

# ---- exit codes (BIDS-Apps execution spec; sysexits.h): the one table ----------------------
class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1             # a node of the graph failed (see its crash file)
    VALIDATION = 16         # the input dataset is not valid BIDS
    UNKNOWN_LEVEL = 17      # analysis level is not participant or group
    NO_DATA = 18            # no matching participant, session or DWI series
    USAGE = 64              # bad command line
    DATAERR = 65            # input data are wrong, or cannot support a model asked for
    NOINPUT = 66            # an input file or folder does not exist (or, at the group level,
                            # a subject's outputs are missing or incomplete)
    CANTCREAT = 73          # the output or work dir cannot be created or written
    TEMPFAIL = 75           # a resource is not there now (the GPU asked for, the network)


EXIT_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.FAILURE: "a processing step failed",
    ExitCode.VALIDATION: "BIDS validation failed",
    ExitCode.UNKNOWN_LEVEL: "unknown analysis level",
    ExitCode.NO_DATA: "no matching participant or data",
    ExitCode.USAGE: "usage error",
    ExitCode.DATAERR: "bad input data",
    ExitCode.NOINPUT: "missing input",
    ExitCode.CANTCREAT: "cannot create output",
    ExitCode.TEMPFAIL: "temporary failure (the GPU asked for is not available, the network)",
}


def exit_codes_help(codes=tuple(ExitCode)) -> str:
    """``Exit codes: 0 success; 1 ...`` for a command's ``--help``."""
    return "Exit codes: " + "; ".join(f"{int(c)} {EXIT_MEANINGS[c]}" for c in codes) + "."


class VaemapError(Exception):
    """An error reported to the user as one line with an exit code (no traceback)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = int(exit_code)


def _methods() -> tuple[str, ...]:
    from .fitting.base import DEFAULT_METHODS
    return DEFAULT_METHODS


#: Plugins that run the nodes on this machine: the device is resolved (and checked) here; any
#: other plugin (SLURM, SGE, ...) resolves it on the node that runs each fit.
LOCAL_PLUGINS = ("MultiProc", "LegacyMultiProc", "Linear")


@dataclass
class Config:
    """Everything a run needs; built by the CLI from argv, or by tests and other callers."""

    bids_dir: str
    output_dir: str
    analysis_level: str = "participant"
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["msdki", "ballstick"])
    models_explicit: bool = False
    methods: list[str] = field(default_factory=lambda: list(_methods()))
    qsm_methods: list[str] = field(default_factory=list)   # --models qsm: tkd, tv, dip
    work_dir: str = ""
    device: str = "auto"            # as asked for
    resolved_device: str = ""       # cpu or cuda after resolving "auto"
    nprocs: int = 0                 # 0 = every CPU
    omp_nthreads: int = 0           # 0 = min(nprocs, 8)
    mem_gb: float = 0.0             # 0 = 90 % of the machine's memory
    seed: int = 0
    config_file: str = ""
    hyperparameters: dict = field(default_factory=dict)
    noise_model: str = ""           # --noise-model for every method ("" = the hyper-parameters')
    derivatives: list[str] = field(default_factory=list)
    plugin: str = "MultiProc"
    plugin_args: dict = field(default_factory=dict)
    skip_bids_validation: bool = False
    validator: str = ""
    input_type: str = "bids"        # bids | hcp | fetch (the HCP data as given on the command line)
                                    # | qsiprep (BIDS_DIR holds QSIPrep derivatives)
    hcp_source: str = ""            # the HCP tree or fetch target before conversion
    hcp_profile: str = ""           # AWS profile name only: credentials are never stored
    verbosity: int = 0
    denoise: str = "none"           # none | mppca | patch2self, before every fit (--denoise)
    denoise_output: bool = False    # also write the denoised series as a derivative
    run_uuid: str = field(default_factory=lambda: (
        f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:8]}"))
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))
    version: str = __version__

    # ---- derived settings -------------------------------------------------------------------
    def fit_options(self, method: str, model: str) -> dict:
        """The resolved hyper-parameters of ``method`` on ``model``: packaged defaults, the
        ``--config`` file, then ``--noise-model``."""
        from .fitting.options import options_for

        opts = options_for(self.hyperparameters, method, model)
        if self.noise_model:
            opts["noise_model"] = self.noise_model
        return opts

    def effective_nprocs(self) -> int:
        return self.nprocs if self.nprocs > 0 else (os.cpu_count() or 1)

    def effective_omp_nthreads(self) -> int:
        n = self.omp_nthreads if self.omp_nthreads > 0 else min(self.effective_nprocs(), 8)
        return max(1, min(n, self.effective_nprocs()))

    def effective_mem_gb(self) -> float:
        if self.mem_gb > 0:
            return float(self.mem_gb)
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
        except (ValueError, OSError, AttributeError):
            total = 8.0
        return round(0.9 * total, 2)

    @property
    def uses_gpu(self) -> bool:
        return self.resolved_device.startswith("cuda")

    @property
    def source_dataset_name(self) -> str:
        """The input's name in BIDS URIs (``bids:<name>:...``) and the output's DatasetLinks."""
        return "qsiprep" if self.input_type == "qsiprep" else "raw"

    @property
    def runs_locally(self) -> bool:
        return self.plugin in LOCAL_PLUGINS

    def nipype_plugin_args(self) -> dict:
        """Plugin arguments: ours for MultiProc/LegacyMultiProc, the user's plugin file on top."""
        args: dict = {}
        if self.plugin in ("MultiProc", "LegacyMultiProc"):
            args = {"n_procs": self.effective_nprocs(), "memory_gb": self.effective_mem_gb(),
                    "raise_insufficient": True}
            if self.uses_gpu:
                # one training per GPU at a time; nvidia-smi may be missing in containers, so
                # count the GPUs PyTorch sees instead of Nipype's default probe
                import torch
                args["n_gpu_procs"] = max(1, torch.cuda.device_count())
        args.update(self.plugin_args)
        return args

    # ---- TOML --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def write_toml(self, path) -> Path:
        """Write the settings as TOML (atomically); returns the path."""
        import tomli_w

        from .atomic import write_text_atomic
        data = {"vaemap": _drop_none(self.to_dict())}
        return write_text_atomic(path, tomli_w.dumps(data))

    @classmethod
    def from_toml(cls, path) -> "Config":
        import tomllib
        data = tomllib.loads(Path(path).read_text())["vaemap"]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def toml_path(self) -> Path:
        return Path(self.work_dir) / f"config-{self.run_uuid}.toml"


def _drop_none(obj):
    if isinstance(obj, dict):
        return {str(k): _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj if v is not None]
    return obj


def subprocess_env(**extra: str) -> dict:
    """The environment for a helper process (the BIDS validator): ours, plus ``extra``."""
    return {**os.environ, **extra}
