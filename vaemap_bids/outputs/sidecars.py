"""Sidecars (BEP016) and the dataset-level files of the derivatives dataset.

Plain functions from what a fit or a series knows to the dictionaries written beside each image;
:mod:`vaemap_bids.outputs.products` calls them.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .. import __version__
from ..atomic import write_json_atomic, write_text_atomic
from ..fitting.base import ESTIMATORS

CODE_URL = "https://github.com/vaemap/vaemap"
PAPER_URL = "https://arxiv.org/abs/2411.10772"

# ---- dataset level ---------------------------------------------------------------------------

def denoise_block(method: str) -> dict:
    """What ran on the series before the fits (``--denoise``), for sidecars and the dataset."""
    from ..dataset.denoise import DESCRIPTIONS, check_denoiser
    return {"Method": check_denoiser(method), "Description": DESCRIPTIONS[method]}


def dataset_description(seed: int, source_dir=None, source_name: str = "raw",
                        denoise: str = "none") -> dict:
    """``dataset_description.json`` of the output dataset (``source_name``: the input's name
    in the sidecars' BIDS URIs, ``bids:<source_name>:...``, linked in ``DatasetLinks``)."""
    desc = {
        "Name": "vaemap: diffusion-MRI parameter maps",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "vaemap",
            "Version": __version__,
            "CodeURL": CODE_URL,
            "Description": f"Parameter maps from physics-informed VAEs and baselines; seed {seed}.",
        }],
        "HowToAcknowledge": f"Cite Xu et al., {PAPER_URL}, and the software listed in the reports.",
        "vaemap": {"seed": int(seed), "denoise": denoise},
    }
    if denoise != "none":
        desc["GeneratedBy"][0]["Description"] += " " + denoise_block(denoise)["Description"]
    if source_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(source_dir).resolve().as_uri()}]
        desc["DatasetLinks"] = {source_name: Path(source_dir).resolve().as_uri()}
    return desc


def bidsignore_text() -> str:
    return (files("vaemap_bids") / "data" / "bidsignore").read_text()


def write_dataset_files(output_dir, seed: int, source_dir=None, source_name: str = "raw",
                        denoise: str = "none") -> None:
    """``dataset_description.json`` and ``.bidsignore`` (the model-/param- names of BEP016 are
    not in the validator's schema yet)."""
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "dataset_description.json",
                      dataset_description(seed, source_dir, source_name, denoise))
    write_text_atomic(output_dir / ".bidsignore", bidsignore_text())


# ---- sidecars --------------------------------------------------------------------------------

def model_block(model_info: dict, method: str, hyperparameters: dict) -> dict:
    """The BEP016 ``Model`` object: what was fitted and how; the likelihood and the noise level
    the fit used go in a ``Noise`` block of their own (they are not tuning knobs)."""
    hyperparameters = dict(hyperparameters)
    noise = hyperparameters.pop("noise", None)
    return {
        "Name": model_info["Name"],
        "LongName": model_info.get("LongName"),
        "Description": model_info["Description"],
        "URL": model_info["URL"],
        "Citation": model_info.get("Citation"),
        "FitMethod": method,
        "FitMethodDescription": ESTIMATORS[method].description if method in ESTIMATORS else method,
        "Parameters": hyperparameters,
        **({"Noise": noise} if noise else {}),
    }


def map_sidecar(model_info: dict, method: str, hyperparameters: dict, param: str, *,
                sources: list[str], seed: int, device: str, stat: str | None = None,
                direction_reference: str | None = None, std_method: str | None = None) -> dict:
    """Sidecar of one parameter map (``stat='std'`` for its posterior standard deviation)."""
    spec = model_info["Parameters"][param]
    side = {
        "Model": model_block(model_info, method, hyperparameters),
        "Description": spec["Description"],
        "Units": spec["Units"],
        "Bounds": spec["Bounds"],
    }
    if stat == "std":
        how = f" ({std_method})" if std_method else ""
        side["Description"] = f"The standard deviation of the estimate of: {spec['Description']}{how}"
    if direction_reference is not None:
        side["OrientationEncoding"] = {"Type": "unit3vector", "Reference": direction_reference}
        side["Description"] = (f"{spec['Description'].split(' (')[0]}: unit vector in the "
                               f"image's voxel axes ({direction_reference}); n and -n are the "
                               "same fibre")
    side.update({"Sources": sources, "RandomSeed": int(seed), "Device": device})
    return side


def nrmse_sidecar(model_info: dict, method: str, hyperparameters: dict, *, sources, seed,
                  device, n_measurements: int) -> dict:
    return {
        "Model": model_block(model_info, method, hyperparameters),
        "Description": ("Normalised root-mean-square residual: RMS(measured - predicted S/S0) / "
                        f"RMS(measured S/S0) over the {n_measurements} volumes the model uses"),
        "Units": "arbitrary",
        "Sources": sources, "RandomSeed": int(seed), "Device": device,
    }


def dseg_sidecar(model_info: dict, method: str, hyperparameters: dict, n_components: int, *,
                 sources, seed, device, probabilistic: bool) -> dict:
    what = ("Responsibilities q(y|S) of the vaegmm mixture components, one volume per component"
            if probabilistic else
            "Hard clustering: the vaegmm mixture component with the largest responsibility "
            "(1..K; 0 outside the mask), labels in the _dseg.tsv")
    return {"Model": model_block(model_info, method, hyperparameters), "Description": what,
            "NumberOfComponents": int(n_components), "Sources": sources,
            "RandomSeed": int(seed), "Device": device}


def dseg_tsv(n_components: int) -> str:
    """The ``_dseg.tsv`` lookup table of the cluster labels."""
    rows = ["index\tname"] + [f"{k + 1}\tcomponent{k + 1}" for k in range(n_components)]
    return "\n".join(rows) + "\n"


def mask_sidecar(source: str, sources: list[str]) -> dict:
    side = {"Type": "Brain", "Description": f"Brain mask ({source})", "Sources": sources}
    if sources:  # the mask is on the grid of the DWI series it was made for
        side["SpatialReference"] = sources[0]
    return side


def valid_mask_sidecar(counts: dict, sources: list[str]) -> dict:
    """The validity mask: which brain-mask voxels carry estimates. Every map is 0 outside it."""
    excluded = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in counts.items() if n)
    side = {"Type": "Brain",
            "Description": ("Brain-mask voxels whose data were fitted (1). Voxels of the brain "
                            "mask excluded before fitting are 0 here and 0 in every map"
                            + (f" ({excluded})" if excluded else "") + "."),
            "ExcludedVoxels": {k: int(v) for k, v in counts.items()},
            "Sources": sources}
    if sources:
        side["SpatialReference"] = sources[0]
    return side
