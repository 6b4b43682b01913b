"""The run record of a series (``<prefix>_summary.json``): what ran on which inputs, for the
reports and the group level."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__, naming
from .table import output


def software_versions() -> dict:
    import dipy
    import nipype
    import torch
    return {"vaemap": __version__, "torch": torch.__version__, "dipy": dipy.__version__,
            "nipype": nipype.__version__, "numpy": np.__version__}


def series_summary(plan: dict, methods: list[str], mask_info: dict, fit_records: list[str],
                   output_dir, *, device: str, seed: int, validator: str, started: str,
                   final: bool = True) -> dict:
    """The summary of one series from its plan (``SeriesPlan.to_dict()``), the mask information
    of PrepareSeries and the paths of its written fit records. The series first gets one
    before its fits (``final=False``: ``finished`` is null), replaced once they are written."""
    series = plan["series"]
    ents = series["entities"]
    models = {}
    for name, decision in plan["models"].items():
        ran = bool(decision["runs"])
        models[name] = {"status": "ran" if ran else "skipped", "reason": decision["reason"],
                        "methods": list(methods) if ran else [],
                        "n_measurements": decision["n_measurements"]}
    excluded = mask_info.get("excluded", {})
    return {
        "subject": ents["subject"],
        "session": ents.get("session"),
        "entities": ents,
        "prefix": naming.prefix(ents),
        "inputs": {"dwi": series["dwi"], "bval": series["bval"], "bvec": series["bvec"],
                   "mask_source": mask_info["source"],
                   **({"source_files": series["sources"]} if series.get("sources") else {})},
        "acquisition": {"n_volumes": plan["n_volumes"], "shells": plan["shells"],
                        "excluded_volumes": plan.get("excluded_volumes", {})},
        "shape": list(plan["shape"]),
        "voxel_size_mm": list(plan["voxel_size_mm"]),
        "mask": {"n_voxels": mask_info["n_voxels"], "n_valid": mask_info.get("n_valid"),
                 "volume_ml": mask_info.get("volume_ml"),
                 "excluded_nonfinite": excluded.get("nonfinite", 0),
                 "excluded_implausible": excluded.get("implausible", 0),
                 "excluded_nonpositive_b0": excluded.get("nonpositive_b0", 0)},
        "noise": mask_info.get("noise"),
        "models": models,
        "denoise": dict(mask_info.get("denoise") or {"method": "none"}),
        "device": device,
        "seed": seed,
        "versions": software_versions(),
        "validator": validator,
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds") if final else None,
        "fit_records": [str(Path(p).relative_to(output_dir)) for p in fit_records],
    }


def summary_output(entities: dict):
    return output("summary", entities)
