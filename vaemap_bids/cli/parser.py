"""The ``vaemap`` command line (BIDS-Apps conventions: ``BIDS_DIR OUTPUT_DIR LEVEL [options]``).

Parsing only checks the shape of the arguments; :mod:`vaemap_bids.cli.run` checks what they point
at and exits with the documented codes. argparse's own errors exit with 64 (usage), not 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from ..config import exit_codes_help
from ..fitting.base import DEFAULT_METHODS, METHODS

ANALYSIS_LEVELS = ("participant", "group")


class UsageError(Exception):
    """A malformed command line (exit code 64)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit 2
        raise UsageError(message)

    def exit(self, status=0, message=None):  # --help / --version exit 0 as usual
        if status:
            raise UsageError((message or "").strip() or "usage error")
        super().exit(status, message)


def _number(kind, minimum, *, strict: bool):
    """An argparse type: ``kind`` (int or float) above ``minimum`` (``strict``) or at least it."""
    noun = "an integer" if kind is int else "a number"
    bound = f"> {minimum}" if strict else f">= {minimum}"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not (value > minimum if strict else value >= minimum):  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value
    return convert


_positive_int = _number(int, 1, strict=False)
_positive_float = _number(float, 0, strict=True)
_nonnegative_int = _number(int, 0, strict=False)


def build_parser() -> argparse.ArgumentParser:
    from ..physics import available_models

    parser = _Parser(
        prog="vaemap",
        description=("Diffusion-MRI parameter maps (MS-DKI, ball-stick) with physics-informed "
                     "VAEs and baselines, as a BIDS-App."),
        epilog=exit_codes_help())
    # optional only with --config-file, which holds them (run.py checks that they are there)
    parser.add_argument("bids_dir", type=Path, metavar="BIDS_DIR", nargs="?",
                        help="the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", nargs="?",
                        help="where the derivatives dataset is written (not inside BIDS_DIR)")
    # a free string, so that an unknown level exits with 17 (BIDS-Apps) rather than 64
    parser.add_argument("analysis_level", metavar="{participant,group}", nargs="?",
                        help="participant: fit every selected series; group: the group level "
                             "(reads participant outputs)")
    parser.add_argument("--version", action="version", version=f"vaemap {__version__}")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                        help="more output: -v progress and Nipype's workflow log, -vv debug "
                             "(also shows tracebacks)")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument("--participant-label", "--participant_label", dest="participant_label",
                     nargs="+", metavar="LABEL", default=[],
                     help="participants to process, with or without 'sub-' (default: all)")
    sel.add_argument("--session-label", "--session_label", dest="session_label", nargs="+",
                     metavar="LABEL", default=[],
                     help="sessions to process, with or without 'ses-' (default: all)")
    sel.add_argument("--derivatives", nargs="+", type=Path, metavar="DIR", default=[],
                     help="derivative datasets holding a *_desc-brain_mask.nii[.gz] per series "
                          "(e.g. QSIPrep's); without one, a mask is computed with dipy's "
                          "median_otsu on the mean b0")
    sel.add_argument("--skip-bids-validation", "--skip_bids_validation",
                     dest="skip_bids_validation", action="store_true",
                     help="do not validate BIDS_DIR")

    hcp = parser.add_argument_group("HCP input")
    source = hcp.add_mutually_exclusive_group()
    source.add_argument("--fetch-hcp", "--fetch_hcp", dest="fetch_hcp", action="store_true",
                        help="download the --participant-label HCP 1200 subjects (e.g. 100307) "
                             "from the hcp-openaccess S3 bucket and convert them into BIDS_DIR "
                             "(created when missing) before the participant level")
    source.add_argument("--input-type", "--input_type", dest="input_type",
                        choices=("bids", "hcp", "qsiprep"), default="bids",
                        help="'hcp': BIDS_DIR is an HCP tree on disk (<id>/T1w/Diffusion/...), "
                             "converted to BIDS in the work dir first; 'qsiprep': BIDS_DIR is "
                             "QSIPrep's output (*_desc-preproc_dwi with its gradients and "
                             "*_desc-brain_mask, used as given; chosen by itself when "
                             "dataset_description.json's GeneratedBy names QSIPrep) (default: "
                             "bids)")
    hcp.add_argument("--hcp-profile", "--hcp_profile", dest="hcp_profile", default=None,
                     metavar="PROFILE",
                     help="AWS profile for --fetch-hcp (default: the standard AWS variables or "
                          "default profile; AWS_ENDPOINT_URL is honoured)")

    mod = parser.add_argument_group("models and estimators")
    from ..qsm.options import QSM_METHODS
    mod.add_argument("--models", nargs="+", choices=available_models() + ["qsm"],
                     metavar="MODEL", default=None,
                     help=f"signal models, from {', '.join(available_models())} (default: all "
                          "that the acquisition supports; a model named here that the "
                          "acquisition cannot support is an error), and qsm (susceptibility "
                          "from MEGRE in anat/; only when named)")
    mod.add_argument("--methods", nargs="+", choices=METHODS + QSM_METHODS, metavar="METHOD",
                     default=list(DEFAULT_METHODS),
                     help=f"estimators, from {', '.join(METHODS)} (diffusion models) and "
                          f"{', '.join(QSM_METHODS)} (qsm); each model runs the methods of its "
                          "family; a method whose family has no model asked for is an error "
                          f"(default: {' '.join(DEFAULT_METHODS)} for the diffusion models, svae "
                          "on request, and all QSM methods for qsm)")
    mod.add_argument("--noise-model", "--noise_model", dest="noise_model",
                     choices=("rician", "gaussian"), default=None,
                     help="likelihood of every estimator: rician (magnitude data, the default of "
                          "the hyper-parameters) or gaussian (plain least squares; reads the "
                          "noise floor as signal). Non-central chi with n coils: noise_model: "
                          "ncchi and n_coils in a --config file")
    mod.add_argument("--config", dest="config_file", type=Path, metavar="HYPERPARAMS.yaml",
                     help="YAML overriding estimator hyper-parameters: {method or "
                          "method@model: {option: value}} (defaults: "
                          "vaemap_bids/data/hyperparameters.yaml)")
    mod.add_argument("--denoise", choices=("none", "mppca", "patch2self"), default="none",
                     help="denoise the series with dipy before every fit: MP-PCA "
                          "(dipy.denoise.localpca.mppca) or Patch2Self (dipy.denoise.patch2self, "
                          "QSIPrep's default); the denoised series stays in the work dir "
                          "(default: none)")
    mod.add_argument("--denoise-output", "--denoise_output", dest="denoise_output",
                     action="store_true",
                     help="also write the denoised series as a derivative "
                          "(<prefix>_desc-denoised_dwi.nii.gz with .bval, .bvec and .json)")
    mod.add_argument("--seed", type=_nonnegative_int, default=0,
                     help="random seed of every estimator (same seed and device, same maps; "
                          "default: 0)")

    perf = parser.add_argument_group("resources and execution")
    perf.add_argument("-w", "--work-dir", "--work_dir", dest="work_dir", type=Path,
                      metavar="WORK_DIR", default=None,
                      help="Nipype work dir: rerunning with the same one resumes a run "
                           "(default: ./work, as fMRIPrep)")
    perf.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="torch device of the fits; 'cuda' without a GPU exits 75 (no "
                           "fall-back); 'auto' uses a GPU when PyTorch sees one (default: auto)")
    perf.add_argument("--nprocs", "--n-cpus", "--nthreads", dest="nprocs", type=_positive_int,
                      default=None, help="processes Nipype runs at once (default: all CPUs)")
    perf.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads",
                      type=_positive_int, default=None,
                      help="CPU threads of one fit (default: min(nprocs, 8))")
    perf.add_argument("--mem-gb", "--mem_gb", dest="mem_gb", type=_positive_float, default=None,
                      help="memory budget of the run in GB (default: 90%% of the machine)")
    perf.add_argument("--use-plugin", "--use_plugin", dest="use_plugin", type=Path,
                      metavar="PLUGIN.yml", default=None,
                      help="Nipype plugin file, e.g. 'plugin: SLURM' and 'plugin_args: "
                           "{sbatch_args: ...}' (default: MultiProc)")
    perf.add_argument("--config-file", "--config_file", dest="run_config", type=Path,
                      metavar="WORK_DIR/config-RUN.toml", default=None,
                      help="rerun (resume, audit) a run from the settings file it wrote into "
                           "its work dir; options given here override the file's")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse ``argv``; raises :class:`UsageError` (exit 64) on a malformed command line.

    ``args.given`` is the set of destinations the command line set explicitly (so that a
    ``--config-file`` supplies everything else)."""
    args = build_parser().parse_args(argv)
    if args.run_config is None and None in (args.bids_dir, args.output_dir, args.analysis_level):
        raise UsageError("BIDS_DIR, OUTPUT_DIR and the analysis level are required (or "
                         "--config-file)")
    explicit = build_parser()
    for action in explicit._actions:
        action.default = argparse.SUPPRESS
    # an absent optional positional still shows, as SUPPRESS (passed through its type)
    args.given = {dest for dest, value in vars(explicit.parse_args(argv)).items()
                  if str(value) != argparse.SUPPRESS}
    return args


__all__ = ["ANALYSIS_LEVELS", "UsageError", "build_parser", "parse_args"]
