"""Entry point ``vaemap``: check everything, build the Nipype graph, run it, map errors to exit codes.

Every problem the user can fix is reported as one line ``vaemap: error: <what>`` with the exit
code of the BIDS-Apps execution spec (see :mod:`vaemap_bids.config`); ``-vv`` adds tracebacks.
All input checks run before the graph is built, so a bad input never leaves partial outputs.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import __version__
from ..config import Config, ExitCode, VaemapError
from .parser import ANALYSIS_LEVELS, UsageError, parse_args

log = logging.getLogger("vaemap")
#: Warn when more than this fraction of a fit's voxels sit at a bound of a parameter's range.
AT_BOUND_WARNING = 0.5


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a scheduler sends at a time limit), raised in the main thread."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    """Run ``vaemap`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    SIGINT and SIGTERM stop the run cleanly: the worker processes are stopped, no secret was
    ever on disk, completed outputs stay complete (they are written atomically) and a rerun
    with the same work dir resumes; the exit code is 128 + the signal number."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no Nipype telemetry call
    previous = signal.signal(signal.SIGTERM, _terminate)
    verbosity = 0
    try:
        try:
            args = parse_args(argv)
        except UsageError as exc:
            raise VaemapError(f"{exc} (see vaemap --help)", ExitCode.USAGE) from None
        verbosity = args.verbosity
        setup_logging(verbosity)
        return run(args)
    except VaemapError as exc:
        if verbosity > 1:
            log.exception("details")
        print(f"vaemap: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        for child in multiprocessing.active_children():  # Nipype's MultiProc workers
            child.terminate()
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"vaemap: {what}; rerun with the same work dir to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vaemap: %(message)s" if verbosity < 2 else
                                           "vaemap %(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("vaemap")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)


# ---- configuration ---------------------------------------------------------------------------

def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _ensure_writable_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vaemap-write-test-"):
            pass
    except OSError as exc:
        raise VaemapError(f"{path}: cannot create or write the {what} ({exc.strerror or exc})",
                          ExitCode.CANTCREAT) from None


def _labels(values, prefix: str) -> list[str]:
    from ..naming import clean_label
    out = []
    for value in values or []:
        try:
            out.append(clean_label(value, prefix))
        except ValueError as exc:
            raise VaemapError(f"--{'participant' if prefix == 'sub' else 'session'}-label: {exc}",
                              ExitCode.USAGE) from None
    return sorted(set(out))


def _read_plugin(path: Path) -> tuple[str, dict]:
    import yaml
    if not path.is_file():
        raise VaemapError(f"{path}: plugin file not found", ExitCode.NOINPUT)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise VaemapError(f"{path}: cannot read the plugin file ({exc})", ExitCode.USAGE) from None
    if not isinstance(data, dict) or not isinstance(data.get("plugin"), str):
        raise VaemapError(f"{path}: a plugin file needs 'plugin: NAME' (and optional "
                          "'plugin_args: {...}')", ExitCode.USAGE)
    plugin_args = data.get("plugin_args") or {}
    if not isinstance(plugin_args, dict):
        raise VaemapError(f"{path}: 'plugin_args' must be a mapping", ExitCode.USAGE)
    return data["plugin"], plugin_args


def _args_from_config(config: Config, args) -> argparse.Namespace:
    """The settings of a ``--config-file``, as the command line would give them, with the
    options given on this command line on top."""
    ns = argparse.Namespace(
        bids_dir=config.bids_dir, output_dir=config.output_dir,
        analysis_level=config.analysis_level, participant_label=config.participant_label,
        session_label=config.session_label,
        models=(config.models + (["qsm"] if config.qsm_methods else [])) if config.models_explicit
        else None, methods=config.methods + config.qsm_methods,
        work_dir=config.work_dir, device=config.device, nprocs=config.nprocs or None,
        omp_nthreads=config.omp_nthreads or None, mem_gb=config.mem_gb or None,
        seed=config.seed, config_file=None, derivatives=config.derivatives, use_plugin=None,
        skip_bids_validation=config.skip_bids_validation, verbosity=config.verbosity,
        fetch_hcp=False, input_type="qsiprep" if config.input_type == "qsiprep" else "bids",
        hcp_profile=None, run_config=None, noise_model=config.noise_model or None,
        denoise=config.denoise, denoise_output=config.denoise_output, given={"input_type", "methods"})
    for dest in args.given:
        setattr(ns, dest, getattr(args, dest))
    return ns


def build_config(args) -> Config:
    """Check what the arguments point at and build the run's :class:`Config`; with
    ``--config-file``, from that file's settings (and the options given next to it)."""
    from ..fitting.options import load_config

    saved = None
    if getattr(args, "run_config", None) is not None:
        path = Path(args.run_config)
        if not path.is_file():
            raise VaemapError(f"{path}: --config-file not found", ExitCode.NOINPUT)
        try:
            saved = Config.from_toml(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VaemapError(f"{path}: not a vaemap settings file ({exc})", ExitCode.USAGE) from None
        if saved.version != __version__:
            log.warning("%s was written by vaemap %s; this is %s", path, saved.version, __version__)
        args = _args_from_config(saved, args)
    if args.bids_dir is None or args.output_dir is None or args.analysis_level is None:
        raise VaemapError("BIDS_DIR, OUTPUT_DIR and the analysis level are required (or "
                          "--config-file) (see vaemap --help)", ExitCode.USAGE)
    bids_dir = Path(args.bids_dir).expanduser().resolve()
    output_dir = Path(args.output_dir).expanduser().resolve()
    if not bids_dir.is_dir():
        raise VaemapError(f"{args.bids_dir}: BIDS_DIR does not exist or is not a folder",
                          ExitCode.NOINPUT)
    if _is_within(output_dir, bids_dir):
        raise VaemapError(f"{args.output_dir}: OUTPUT_DIR must not be BIDS_DIR or inside it "
                          "(vaemap never writes into the input dataset)", ExitCode.USAGE)
    work_dir = Path(args.work_dir or "work").expanduser().resolve()
    if _is_within(work_dir, bids_dir):
        raise VaemapError(f"{work_dir}: the work dir must not be inside BIDS_DIR", ExitCode.USAGE)
    for deriv in args.derivatives:
        if not Path(deriv).is_dir():
            raise VaemapError(f"{deriv}: --derivatives folder does not exist", ExitCode.NOINPUT)
    hyper, config_file = {}, ""
    if args.config_file is not None:
        if not Path(args.config_file).is_file():
            raise VaemapError(f"{args.config_file}: --config file not found", ExitCode.NOINPUT)
        try:
            hyper = load_config(args.config_file)
        except ValueError as exc:
            raise VaemapError(str(exc), ExitCode.USAGE) from None
        config_file = str(Path(args.config_file).resolve())
    elif saved is not None:  # the hyper-parameters as that run used them, not the file now
        hyper, config_file = saved.hyperparameters, saved.config_file
    from ..fitting.options import check_options
    from ..physics import available_models
    dwi_models, dwi_methods, qsm_methods = split_families(args)
    if qsm_methods:
        from ..qsm.options import qsm_options
        try:
            qsm_options(hyper)
        except ValueError as exc:
            where = f"{config_file}: " if config_file else ""
            raise VaemapError(f"{where}{exc}", ExitCode.USAGE) from None
    probe = Config(bids_dir="", output_dir="", hyperparameters=hyper,
                   noise_model=args.noise_model or "")
    for model in dwi_models:
        for method in dwi_methods:
            try:
                check_options(method, model, probe.fit_options(method, model))
            except ValueError as exc:
                where = f"{config_file}: " if config_file else ""
                raise VaemapError(f"{where}{exc}", ExitCode.USAGE) from None
    input_type = _qsiprep_or_bids(args, bids_dir)
    if input_type == "qsiprep" and args.derivatives:
        raise VaemapError("--derivatives: QSIPrep input uses QSIPrep's own brain masks "
                          "(*_desc-brain_mask.nii.gz beside each DWI); leave --derivatives out",
                          ExitCode.USAGE)
    if args.denoise_output and args.denoise == "none":
        raise VaemapError("--denoise-output writes the denoised series: it needs --denoise "
                          "mppca or patch2self", ExitCode.USAGE)
    plugin, plugin_args = "MultiProc", {}
    if args.use_plugin is not None:
        plugin, plugin_args = _read_plugin(Path(args.use_plugin))
    elif saved is not None:
        plugin, plugin_args = saved.plugin, saved.plugin_args
    return Config(
        bids_dir=str(bids_dir), output_dir=str(output_dir), analysis_level=args.analysis_level,
        participant_label=_labels(args.participant_label, "sub"),
        session_label=_labels(args.session_label, "ses"),
        models=dwi_models, models_explicit=bool(args.models), methods=dwi_methods,
        qsm_methods=qsm_methods,
        work_dir=str(work_dir), device=args.device, nprocs=args.nprocs or 0,
        omp_nthreads=args.omp_nthreads or 0, mem_gb=args.mem_gb or 0.0, seed=args.seed,
        config_file=config_file, hyperparameters=hyper, noise_model=args.noise_model or "",
        derivatives=[str(Path(d).resolve()) for d in args.derivatives],
        plugin=plugin, plugin_args=plugin_args, skip_bids_validation=args.skip_bids_validation,
        verbosity=args.verbosity, input_type=input_type, denoise=args.denoise,
        denoise_output=args.denoise_output)


def _qsiprep_or_bids(args, bids_dir: Path) -> str:
    """``qsiprep`` when asked for, or when not told otherwise and ``dataset_description.json``
    says QSIPrep generated BIDS_DIR; else ``bids`` (HCP input is BIDS once converted)."""
    from ..dataset.qsiprep import generated_by_qsiprep
    asked = getattr(args, "input_type", "bids")
    if asked == "qsiprep":
        return "qsiprep"
    detected = generated_by_qsiprep(bids_dir)
    if "input_type" not in getattr(args, "given", ()) and detected:
        log.info("%s: GeneratedBy QSIPrep in dataset_description.json: reading it as QSIPrep "
                 "derivatives (--input-type qsiprep)", bids_dir)
        return "qsiprep"
    if detected and asked == "bids":
        log.warning("%s was generated by QSIPrep but --input-type bids was given: its .bvec is "
                    "read in FSL's convention and its masks are not used", bids_dir)
    return "bids"


def _qsm_methods() -> tuple:
    from ..qsm.options import QSM_METHODS
    return QSM_METHODS


def split_families(args) -> tuple[list, list, list]:
    """``(diffusion models, diffusion methods, QSM methods)`` of the command line.

    ``--methods`` is checked per model family: each model runs the methods of its family
    (diffusion: lsq ssl vaeunig vaegmm; qsm: tkd tv dip); without ``--methods`` every model runs
    all of its family's methods. Given ``--methods``, a family asked for in ``--models`` with none
    of its methods listed, or a method whose family has no model asked for, is a usage error.
    ``qsm`` runs only when named in ``--models``."""
    from ..fitting.base import DEFAULT_METHODS, METHODS
    from ..physics import available_models
    qsm_all = _qsm_methods()
    asked = list(dict.fromkeys(args.models)) if args.models else None
    want_qsm = bool(asked) and "qsm" in asked
    dwi_models = [m for m in asked if m != "qsm"] if asked else available_models()
    methods = list(dict.fromkeys(args.methods))
    explicit = "methods" in getattr(args, "given", {"methods"})
    if not explicit:
        return dwi_models, list(DEFAULT_METHODS) if dwi_models else [], \
            list(qsm_all) if want_qsm else []
    dwi_methods = [m for m in methods if m in METHODS]
    qsm_methods = [m for m in methods if m in qsm_all]
    if qsm_methods and not want_qsm:
        raise VaemapError(f"--methods {' '.join(qsm_methods)}: QSM methods need --models qsm",
                          ExitCode.USAGE)
    if want_qsm and not qsm_methods:
        raise VaemapError(f"--models qsm needs one of {', '.join(qsm_all)} in --methods",
                          ExitCode.USAGE)
    if dwi_methods and not dwi_models:
        raise VaemapError(f"--methods {' '.join(dwi_methods)}: diffusion methods need a "
                          f"diffusion model in --models ({', '.join(available_models())})",
                          ExitCode.USAGE)
    if dwi_models and not dwi_methods:
        if asked:
            raise VaemapError(f"--models {' '.join(dwi_models)} needs one of "
                              f"{', '.join(METHODS)} in --methods", ExitCode.USAGE)
        dwi_models = []
    return dwi_models, dwi_methods, qsm_methods


def resolve_device(config: Config) -> None:
    """The device of the fits, resolved (and checked) here when the nodes run here; with a
    cluster plugin, each fit node resolves ``--device`` on the machine it runs on."""
    from ..fitting import DeviceUnavailableError, resolve_device as _resolve
    if not config.runs_locally:
        config.resolved_device = config.device
        log.info("the device (--device %s) is resolved on the nodes that run the fits",
                 config.device)
        if config.plugin.startswith("SLURM"):  # Nipype's SLURM plugin reads LOGNAME
            os.environ.setdefault("LOGNAME", getpass.getuser())
        return
    try:
        config.resolved_device = str(_resolve(config.device))
    except DeviceUnavailableError as exc:
        raise VaemapError(f"{exc} (no fall-back to CPU: use --device cpu or auto)",
                          ExitCode.TEMPFAIL) from None


# ---- participant level -----------------------------------------------------------------------

def plan_all(config: Config):
    """Find the selected series and check each one (in parallel threads: the checks stream
    through every image once, and zlib releases the GIL)."""
    from ..dataset.bids import NoMatchingData, collect_dwi_series, plan_series

    plan_dir = Path(config.work_dir) / "plans"
    qsm_plans = plan_qsm_all(config) if config.qsm_methods else []
    series = []
    if config.models:
        try:
            if config.input_type == "qsiprep":
                from ..dataset.qsiprep import collect_qsiprep_series
                series = collect_qsiprep_series(config.bids_dir, config.participant_label,
                                                config.session_label,
                                                gradient_dir=plan_dir / "qsiprep_gradients")
            else:
                series = collect_dwi_series(config.bids_dir, config.participant_label,
                                            config.session_label)
        except NoMatchingData as exc:
            if not qsm_plans or config.models_explicit:
                raise VaemapError(str(exc), ExitCode.NO_DATA) from None
        except FileNotFoundError as exc:
            raise VaemapError(str(exc).strip("'\""), ExitCode.NOINPUT) from None
        except ValueError as exc:
            raise VaemapError(str(exc), ExitCode.DATAERR) from None
    if not series:
        return qsm_plans

    def check(one):
        try:
            return plan_series(one, config.models, config.models_explicit, config.derivatives,
                               plan_dir=plan_dir)
        except FileNotFoundError as exc:
            return VaemapError(str(exc).strip("'\""), ExitCode.NOINPUT)
        except ValueError as exc:
            return VaemapError(str(exc), ExitCode.DATAERR)

    with ThreadPoolExecutor(max_workers=min(len(series), config.effective_nprocs())) as pool:
        results = list(pool.map(check, series))
    for result in results:
        if isinstance(result, VaemapError):
            raise result
    return results + qsm_plans


def plan_qsm_all(config: Config):
    """Find and check every MEGRE series of the selection (``--models qsm``)."""
    from ..qsm.inputs import collect_megre_series, plan_qsm_series
    root = Path(config.bids_dir)
    subjects = sorted(p.name[4:] for p in root.glob("sub-*") if p.is_dir())
    unknown = [s for s in config.participant_label if s not in subjects]
    if unknown:
        raise VaemapError(f"{config.bids_dir}: participant(s) {', '.join(unknown)} not found "
                          f"(the dataset has: {', '.join(subjects) or 'none'})", ExitCode.NO_DATA)
    series = collect_megre_series(config.bids_dir, config.participant_label,
                                  config.session_label)
    if not series:
        who = ", ".join(config.participant_label) or "any participant"
        raise VaemapError(f"{config.bids_dir}: --models qsm: no MEGRE series (anat/*_echo-<N>_"
                          f"part-{{mag,phase}}_MEGRE.nii[.gz]) found for {who}", ExitCode.NO_DATA)
    plans = []
    for one in series:
        try:
            plans.append(plan_qsm_series(one, config.derivatives))
        except FileNotFoundError as exc:
            raise VaemapError(str(exc).strip("'\""), ExitCode.NOINPUT) from None
        except ValueError as exc:
            raise VaemapError(str(exc), ExitCode.DATAERR) from None
    return plans


def _check_level(level) -> None:
    if level not in ANALYSIS_LEVELS:
        raise VaemapError(f"unknown analysis level {level!r}; choose participant or group",
                          ExitCode.UNKNOWN_LEVEL)


def run(args) -> int:
    from .credentials import secrets_withheld
    hcp_source = ""
    if args.run_config is None:  # the settings file holds the level and the converted input
        if args.analysis_level is not None:
            _check_level(args.analysis_level)
        if args.analysis_level == "participant":
            hcp_source = prepare_hcp(args)  # in this process, where the credentials are
    config = build_config(args)
    _check_level(config.analysis_level)
    if config.analysis_level == "group":
        return run_group_level(config)
    if hcp_source:
        config.input_type = "fetch" if args.fetch_hcp else "hcp"
        config.hcp_source = hcp_source
        config.hcp_profile = args.hcp_profile or ""
    # Nipype records each node's environment in the work dir: keep AWS secrets out of it.
    with secrets_withheld():
        run_participant_level(config)
    return ExitCode.OK


def prepare_hcp(args) -> str:
    """``--fetch-hcp`` / ``--input-type hcp``: get the HCP subjects into BIDS before anything
    else (the participant plan reads the converted files), then point ``args`` at them: BIDS_DIR
    becomes the converted dataset and its HCP brain masks join ``--derivatives``. Returns the
    HCP source as given, or "" for plain BIDS input."""
    if not args.fetch_hcp and args.input_type != "hcp":
        return ""
    from ..hcp import HCPError
    from ..workflows.hcp import prepare_hcp_input

    source = Path(args.bids_dir).expanduser().resolve()
    output_dir = Path(args.output_dir).expanduser().resolve()
    work_dir = Path(args.work_dir or "work").expanduser().resolve()
    if _is_within(output_dir, source):
        raise VaemapError(f"{args.output_dir}: OUTPUT_DIR must not be inside {source}",
                          ExitCode.USAGE)
    labels = _labels(args.participant_label, "sub")
    _ensure_writable_dir(work_dir, "work dir")
    try:
        bids_dir, masks = prepare_hcp_input(
            "fetch" if args.fetch_hcp else "hcp", source, labels, work_dir / "hcp",
            profile=args.hcp_profile, progress=sys.stderr.isatty())
    except HCPError as exc:
        raise VaemapError(str(exc), exc.exit_code) from None
    except ValueError as exc:
        raise VaemapError(str(exc), ExitCode.USAGE) from None
    args.bids_dir = bids_dir
    if not args.derivatives:
        args.derivatives = [masks]
    return str(source)


def run_group_level(config: Config) -> int:
    """Group tables and report from the participant outputs already in OUTPUT_DIR (no fit is
    recomputed); non-zero when a subject is missing or incomplete."""
    from ..reports.group import run_group

    output_dir = Path(config.output_dir)
    if not output_dir.is_dir():
        raise VaemapError(f"{output_dir}: OUTPUT_DIR holds no participant outputs (run the "
                          "participant level first)", ExitCode.NOINPUT)
    _ensure_writable_dir(output_dir, "output dir")
    with folder_lock(output_dir / "logs", "output dir"):
        code = run_group(output_dir, bids_dir=config.bids_dir,
                         participant_labels=config.participant_label or None)
    report = output_dir / "group.html"
    if code == ExitCode.OK:
        log.info("group report: %s", report)
    elif code == ExitCode.NO_DATA:
        print(f"vaemap: error: no participant to report on (none selected or found); see {report}",
              file=sys.stderr)
    else:
        print(f"vaemap: error: some participants' outputs are missing or incomplete; see {report}",
              file=sys.stderr)
    return code


@contextlib.contextmanager
def folder_lock(folder: Path, what: str):
    """Hold an advisory lock on ``folder/.vaemap.lock`` for the duration; a second vaemap run
    on the same folder exits 75 at once (the lock goes with the process, even on SIGKILL)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".vaemap.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise VaemapError(f"{folder}: another vaemap run (pid {holder}) is using this {what}; "
                          "wait for it to finish, or use another one", ExitCode.TEMPFAIL) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def check_output_dataset(config: Config) -> None:
    """OUTPUT_DIR may only be empty or a vaemap derivatives dataset of this version and seed:
    never a raw dataset (it would be overwritten), and never a mix of seeds or versions whose
    sidecars would disagree with its dataset_description.json."""
    path = Path(config.output_dir) / "dataset_description.json"
    if not path.is_file():
        return
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VaemapError(f"{path}: not readable JSON ({exc})", ExitCode.USAGE) from None
    if desc.get("DatasetType", "raw") != "derivative":
        raise VaemapError(f"{config.output_dir}: holds a raw BIDS dataset (its "
                          "dataset_description.json has no DatasetType 'derivative'); choose "
                          "another OUTPUT_DIR", ExitCode.USAGE)
    generated = (desc.get("GeneratedBy") or [{}])[0]
    name, version = generated.get("Name"), generated.get("Version")
    if name != "vaemap":
        who = name or "another pipeline"
        raise VaemapError(f"{config.output_dir}: holds derivatives of {who}; choose another "
                          "OUTPUT_DIR", ExitCode.USAGE)
    seed = (desc.get("vaemap") or {}).get("seed")
    if seed is not None and int(seed) != config.seed:
        raise VaemapError(f"{config.output_dir}: holds vaemap outputs of --seed {seed}; rerun "
                          f"with --seed {seed} to add to them, or choose another OUTPUT_DIR",
                          ExitCode.USAGE)
    denoise = (desc.get("vaemap") or {}).get("denoise")
    if denoise is not None and denoise != config.denoise:
        raise VaemapError(f"{config.output_dir}: holds vaemap outputs of --denoise {denoise}; "
                          f"rerun with --denoise {denoise} to add to them, or choose another "
                          "OUTPUT_DIR", ExitCode.USAGE)
    if version != __version__:
        raise VaemapError(f"{config.output_dir}: holds outputs of vaemap {version}, this is "
                          f"{__version__}; choose another OUTPUT_DIR", ExitCode.USAGE)


def run_participant_level(config: Config, status_callback=None, resource_monitor: bool = False):
    """Every check, then the graph. ``status_callback`` and ``resource_monitor`` are for
    benchmarks (Nipype's per-node callback; its resource monitor needs psutil)."""
    resolve_device(config)
    _ensure_writable_dir(Path(config.work_dir), "work dir")
    with folder_lock(Path(config.work_dir), "work dir"):
        return _participant_level(config, status_callback, resource_monitor)


def _participant_level(config: Config, status_callback, resource_monitor):
    """Every input check (nothing is written into OUTPUT_DIR before they all pass), then the
    graph, holding OUTPUT_DIR's lock."""
    check_output_dataset(config)
    warnings = []
    if config.input_type == "qsiprep":  # the BIDS validator checks raw datasets only
        from ..dataset.qsiprep import VALIDATOR_NOTE, check_qsiprep_dataset
        try:
            check_qsiprep_dataset(config.bids_dir)
        except ValueError as exc:
            raise VaemapError(str(exc), ExitCode.DATAERR) from None
        config.validator = VALIDATOR_NOTE
    elif config.skip_bids_validation:
        config.validator = "skipped (--skip-bids-validation)"
    else:
        from ..dataset.bids import ValidationFailed, validate_dataset
        try:
            report = validate_dataset(config.bids_dir, config.work_dir)
        except ValidationFailed as exc:
            raise VaemapError(str(exc), ExitCode.VALIDATION) from None
        config.validator, warnings = report.validator, report.warnings
    plans = plan_all(config)
    for plan in plans:
        for model, decision in plan.models.items():
            if not decision.runs:
                log.info("%s: %s skipped: %s", plan.series.prefix, model, decision.reason)
    if not any(plan.models_to_run() for plan in plans):
        first = plans[0]
        reasons = "; ".join(f"{m}: {d.reason}" for m, d in first.models.items())
        raise VaemapError(f"{first.series.dwi}: no model can run on the selected data, so "
                          f"nothing would be produced ({reasons})", ExitCode.DATAERR)

    out_dir = Path(config.output_dir)
    _ensure_writable_dir(out_dir, "output dir")
    with folder_lock(out_dir / "logs", "output dir"):
        return _run_graph(config, plans, warnings, status_callback, resource_monitor)


def _run_graph(config: Config, plans, warnings, status_callback, resource_monitor):
    from ..atomic import remove_stale_temporaries, write_json_atomic
    from ..outputs.sidecars import write_dataset_files
    out_dir = Path(config.output_dir)
    try:
        removed = remove_stale_temporaries(out_dir)
        if removed:
            log.info("removed %d temporary files an interrupted run left in %s", removed, out_dir)
        write_dataset_files(config.output_dir, config.seed, config.bids_dir,
                            config.source_dataset_name, denoise=config.denoise)
        if warnings:
            listed = write_json_atomic(out_dir / "logs" / "bids-validator-warnings.json",
                                       {"validator": config.validator, "warnings": warnings})
            log.info("the BIDS validator gave %d warnings, listed in %s", len(warnings), listed)
        toml = config.write_toml(config.toml_path())
    except OSError as exc:
        raise VaemapError(f"cannot write the output dataset files ({exc})", ExitCode.CANTCREAT) from None
    log.info("settings written to %s", toml)

    from ..workflows.base import configure_nipype, init_vaemap_wf, run_vaemap_wf
    configure_nipype(config, resource_monitor=resource_monitor)
    wf = init_vaemap_wf(config, plans)
    log.info("device %s; %d series; models/methods: %s", config.resolved_device, len(plans),
             ", ".join(f"{p.series.prefix}: {'+'.join(p.models_to_run()) or 'none'}" for p in plans))
    try:
        run_vaemap_wf(wf, config, status_callback=status_callback)
    except Exception as exc:  # MultiProc raises RuntimeError; Linear re-raises the node's error
        failure = VaemapError(_workflow_failure(exc, out_dir / "logs"), ExitCode.FAILURE)
        try:  # the fits that finished keep their report
            finish_participants(config, plans)
        except VaemapError as report_error:
            log.warning("%s", report_error)
        raise failure from exc
    finish_participants(config, plans)
    return plans


def _workflow_failure(exc: Exception, crash_dir: Path) -> str:
    """One line: the error (the last line of Nipype's traceback text) and the crash files."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    crashes = sorted(crash_dir.glob("crash-*"))
    if not crashes:
        return f"the workflow failed: {reason}"
    return (f"the workflow failed: {reason}; {len(crashes)} crash file(s) in {crash_dir} "
            "(rerun with the same work dir to resume after fixing the cause)")


def finish_participants(config: Config, plans) -> None:
    """After the graph: one HTML report per subject, and where everything is."""
    from .. import naming
    from ..reports.participant import generate_participant_report

    from ..outputs.table import output
    from ..qsm.inputs import QsmPlan
    for plan in plans:
        sub_dir = Path(config.output_dir) / naming.subject_dir(plan.series.entities)
        if isinstance(plan, QsmPlan):
            log.info("%s: QSM maps in %s", plan.series.prefix, sub_dir / "anat")
            continue
        log.info("%s: maps in %s, run records in %s", plan.series.prefix, sub_dir / "dwi",
                 sub_dir / "log")
        for model in plan.models_to_run():
            for method in config.methods:
                path = Path(config.output_dir) / output("fit_record", plan.series.entities,
                                                        model=model, method=method).path
                if not path.is_file():
                    continue
                record = json.loads(path.read_text())
                n, at_bound = record.get("n_voxels") or 0, record.get("n_at_bound") or 0
                if n and at_bound > AT_BOUND_WARNING * n:
                    log.warning("%s %s/%s: %.0f %% of the voxels have a parameter at a bound of "
                                "its range: is the signal constant, or the model wrong for these "
                                "data?", plan.series.prefix, model, method, 100 * at_bound / n)
    dwi_subjects = {p.series.entities["subject"] for p in plans if not isinstance(p, QsmPlan)}
    for subject in sorted({plan.series.entities["subject"] for plan in plans}):
        try:
            if subject in dwi_subjects:
                generate_participant_report(config.output_dir, subject, bids_dir=config.bids_dir)
            if any(isinstance(p, QsmPlan) and p.series.entities["subject"] == subject
                   for p in plans):
                from ..reports.qsm import add_qsm_report
                add_qsm_report(config.output_dir, subject)
        except (OSError, ValueError) as exc:
            raise VaemapError(f"sub-{subject}: the report could not be written ({exc})",
                              ExitCode.CANTCREAT) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
