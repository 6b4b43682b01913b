"""Every output file name vaemap writes, from one table.

A *prefix* is the input DWI series' entities in BIDS order (sub, ses, acq, run, space), e.g.
``sub-01_ses-pre_acq-multishell``. Everything a series produces is named ``<prefix>_<...>``.

Derivatives (``OUTPUT_DIR/sub-<L>[/ses-<S>]/dwi/``):

============================  ==================================================================
kind                          name
============================  ==================================================================
brain mask                    ``<prefix>_desc-brain_mask.nii.gz``
parameter map                 ``<prefix>_model-<model>_desc-<method>_param-<param>_dwimap.nii.gz``
posterior standard deviation  ``<prefix>_model-<model>_desc-<method>_param-<param>_stat-std_dwimap.nii.gz``
fit residual (NRMSE)          ``<prefix>_model-<model>_desc-<method>_stat-nrmse_dwimap.nii.gz``
vaegmm hard clusters          ``<prefix>_model-<model>_desc-vaegmm_dseg.nii.gz`` (+ ``_dseg.tsv`` table)
vaegmm responsibilities       ``<prefix>_model-<model>_desc-vaegmm_probseg.nii.gz`` (4-D, K vols)
============================  ==================================================================

Each ``.nii.gz`` has a ``.json`` sidecar of the same stem. Run records that reports read live in
``OUTPUT_DIR/sub-<L>[/ses-<S>]/log/``:

- ``<prefix>_summary.json``: inputs, acquisition shells, mask size, which models/methods ran or
  were skipped and why, device, seed, versions;
- ``<prefix>_model-<model>_desc-<method>_fit.json``: hyper-parameters, training history (per
  epoch: loss, recon, kl, beta, tau, val_loss), timings, device, fit-quality counts;
- ``<prefix>_model-<model>_desc-<method>_latent.npz``: a voxel subsample of posterior means
  (``latent_mean``), ``responsibilities`` (vaegmm) and their voxel indices (``index``).
"""
from __future__ import annotations

import re

#: Input entities carried into output names, in BIDS order.
PREFIX_ENTITIES = ("subject", "session", "acquisition", "run", "space")
_ENTITY_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "run": "run",
                "space": "space"}
_LABEL = re.compile(r"^[A-Za-z0-9]+$")

MAP_SUFFIX = "dwimap"
STD_STAT = "std"
NRMSE_STAT = "nrmse"


def check_label(value: str, what: str = "label") -> str:
    """A BIDS label: letters and digits only (rejects '/', '..', '_' and '-')."""
    value = str(value)
    if not _LABEL.match(value):
        raise ValueError(f"invalid {what} {value!r}: BIDS labels are letters and digits only")
    return value


def prefix(entities: dict) -> str:
    """``sub-01_ses-a_acq-b_run-1`` from ``{"subject": "01", "session": "a", ...}``."""
    if not entities.get("subject"):
        raise ValueError("a subject label is required")
    parts = []
    for key in PREFIX_ENTITIES:
        val = entities.get(key)
        if val is None or val == "":
            continue
        parts.append(f"{_ENTITY_KEYS[key]}-{check_label(val, key) if key != 'run' else _run_index(val)}")
    return "_".join(parts)


def _run_index(value) -> str:
    """A run index as the input wrote it (``run-01`` stays ``run-01``; pybids' PaddedInt keeps
    the padding in ``str``)."""
    text = str(value)
    if not text.isdigit():
        raise ValueError(f"invalid run {text!r}: BIDS run indices are non-negative integers")
    return text


def subject_dir(entities: dict) -> str:
    """``sub-<L>`` or ``sub-<L>/ses-<S>`` (relative to OUTPUT_DIR)."""
    sub = f"sub-{check_label(entities['subject'], 'subject')}"
    ses = entities.get("session")
    return f"{sub}/ses-{check_label(ses, 'session')}" if ses else sub


def dwi_dir(entities: dict) -> str:
    return f"{subject_dir(entities)}/dwi"


def log_dir(entities: dict) -> str:
    return f"{subject_dir(entities)}/log"


def mask_name(entities: dict) -> str:
    return f"{prefix(entities)}_desc-brain_mask.nii.gz"


def map_name(entities: dict, model: str, method: str, param: str, stat: str | None = None) -> str:
    stat_part = f"_stat-{stat}" if stat else ""
    return f"{prefix(entities)}_model-{model}_desc-{method}_param-{param}{stat_part}_{MAP_SUFFIX}.nii.gz"


def nrmse_name(entities: dict, model: str, method: str) -> str:
    """Voxelwise RMS of (measured - predicted) S/S0 over the model's volumes, divided by the RMS
    of the measured S/S0."""
    return f"{prefix(entities)}_model-{model}_desc-{method}_stat-{NRMSE_STAT}_{MAP_SUFFIX}.nii.gz"


def dseg_name(entities: dict, model: str, method: str = "vaegmm") -> str:
    return f"{prefix(entities)}_model-{model}_desc-{method}_dseg.nii.gz"


def dseg_table_name(entities: dict, model: str, method: str = "vaegmm") -> str:
    """The lookup table (index, name) that BIDS pairs with a dseg image."""
    return f"{prefix(entities)}_model-{model}_desc-{method}_dseg.tsv"


def probseg_name(entities: dict, model: str, method: str = "vaegmm") -> str:
    return f"{prefix(entities)}_model-{model}_desc-{method}_probseg.nii.gz"


def summary_name(entities: dict) -> str:
    return f"{prefix(entities)}_summary.json"


def fit_record_name(entities: dict, model: str, method: str) -> str:
    return f"{prefix(entities)}_model-{model}_desc-{method}_fit.json"


def latent_name(entities: dict, model: str, method: str) -> str:
    return f"{prefix(entities)}_model-{model}_desc-{method}_latent.npz"


def sidecar(nifti_name: str) -> str:
    """``x.nii.gz`` -> ``x.json``; ``x_dseg.nii.gz`` -> ``x_dseg.json``."""
    return re.sub(r"\.nii(\.gz)?$", ".json", nifti_name)


def parse(name: str) -> dict:
    """Entities of an output name, e.g. ``{"sub": "01", "model": "msdki", ..., "suffix": "dwimap"}``."""
    stem = re.sub(r"\.(nii\.gz|nii|json|npz|tsv)$", "", name.rsplit("/", 1)[-1])
    parts = stem.split("_")
    out = dict(p.split("-", 1) for p in parts[:-1] if "-" in p)
    out["suffix"] = parts[-1]
    return out
