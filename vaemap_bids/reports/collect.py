"""Find and read what the participant workflow wrote, by the names in :mod:`vaemap_bids.naming`.

One :class:`Series` is one input DWI series (one ``<prefix>_summary.json``). Images are returned in
the closest canonical (RAS+) orientation, so that every figure is drawn the same way whatever the
input's orientation.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import naming
from ..physics import get_model_class

VAE_METHODS = ("vaeunig", "vaegmm")
METHOD_ORDER = ("lsq", "ssl", "vaeunig", "vaegmm")
_SUB_DIR = re.compile(r"^sub-([A-Za-z0-9]+)$")


def clean_label(label: str, what: str = "participant") -> str:
    """A participant/session label with or without its ``sub-``/``ses-`` prefix -> the bare label
    (ValueError when it is not letters and digits)."""
    label = str(label)
    for pre in ("sub-", "ses-"):
        if label.startswith(pre):
            label = label[len(pre):]
    return naming.check_label(label, f"{what} label")


def sort_methods(methods) -> list[str]:
    """Methods in the paper's order (lsq, ssl, vaeunig, vaegmm), unknown ones last."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: (rank.get(m, len(rank)), m))


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_canonical(path: Path) -> np.ndarray:
    """Image data as float32 in the closest canonical (RAS+) orientation."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj, dtype=np.float32)


@dataclass
class Series:
    """The outputs of one DWI series of one participant."""

    output_dir: Path
    summary_path: Path
    summary: dict
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- identity ----------------------------------------------------------------------------
    @cached_property
    def entities(self) -> dict:
        ent = dict(self.summary.get("entities") or {})
        ent.setdefault("subject", self.summary.get("subject"))
        if self.summary.get("session") and not ent.get("session"):
            ent["session"] = self.summary.get("session")
        return ent

    @property
    def subject(self) -> str:
        return str(self.entities["subject"])

    @property
    def session(self) -> str | None:
        return self.entities.get("session") or None

    @cached_property
    def prefix(self) -> str:
        return naming.prefix(self.entities)

    def entity_value(self, key: str):
        val = self.entities.get(key)
        return None if val in (None, "") else val

    # ---- paths -------------------------------------------------------------------------------
    def dwi_path(self, name: str) -> Path:
        return self.output_dir / naming.dwi_dir(self.entities) / name

    def log_path(self, name: str) -> Path:
        return self.output_dir / naming.log_dir(self.entities) / name

    # ---- what ran ----------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, dict]:
        return dict(self.summary.get("models") or {})

    def ran(self) -> dict[str, list[str]]:
        """{model: [methods]} for the models whose status is ``ran``."""
        return {name: sort_methods(info.get("methods") or [])
                for name, info in self.models.items() if info.get("status") == "ran"}

    def fit_record(self, model: str, method: str) -> dict | None:
        key = ("fit", model, method)
        if key not in self._cache:
            path = self.log_path(naming.fit_record_name(self.entities, model, method))
            self._cache[key] = read_json(path) if path.is_file() else None
        return self._cache[key]

    @staticmethod
    def param_specs(model: str):
        """The model's parameter specs (empty when the model is not registered here)."""
        try:
            return get_model_class(model).parameters
        except ValueError:
            return ()

    def fit_timing(self, model: str, method: str) -> tuple[float | None, float | None]:
        """(wall seconds, voxels per second) of one fit, from its record's ``timings``."""
        t = (self.fit_record(model, method) or {}).get("timings") or {}
        return t.get("fit_seconds"), t.get("voxels_per_second")

    # ---- images ------------------------------------------------------------------------------
    def _image(self, name: str) -> np.ndarray | None:
        key = ("img", name)
        if key not in self._cache:
            path = self.dwi_path(name)
            self._cache[key] = load_canonical(path) if path.is_file() else None
        return self._cache[key]

    def mask(self) -> np.ndarray | None:
        data = self._image(naming.mask_name(self.entities))
        return None if data is None else data > 0

    def map(self, model: str, method: str, param: str, stat: str | None = None):
        return self._image(naming.map_name(self.entities, model, method, param, stat))

    def nrmse(self, model: str, method: str):
        return self._image(naming.nrmse_name(self.entities, model, method))

    def dseg(self, model: str, method: str = "vaegmm"):
        return self._image(naming.dseg_name(self.entities, model, method))

    def probseg(self, model: str, method: str = "vaegmm"):
        return self._image(naming.probseg_name(self.entities, model, method))

    def latent(self, model: str, method: str) -> dict | None:
        path = self.log_path(naming.latent_name(self.entities, model, method))
        if not path.is_file():
            return None
        with np.load(path) as npz:
            return {k: np.asarray(npz[k]) for k in npz.files}

    def drop_images(self) -> None:
        """Forget cached images (the group level reads many series one after another)."""
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "img"}

    # ---- completeness ------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Why this series' outputs are incomplete (empty when complete)."""
        out = []
        for key in ("models", "acquisition", "mask"):
            if key not in self.summary:
                out.append(f"{self.summary_path.name} has no '{key}' entry")
        if not self.dwi_path(naming.mask_name(self.entities)).is_file():
            out.append(f"missing {naming.mask_name(self.entities)}")
        for model, info in self.models.items():
            status = info.get("status")
            if status == "skipped":
                continue
            if status != "ran":
                out.append(f"model {model}: status {status!r}"
                           + (f" ({info['reason']})" if info.get("reason") else ""))
                continue
            for method in sort_methods(info.get("methods") or []):
                if self.fit_record(model, method) is None:
                    out.append(f"missing {naming.fit_record_name(self.entities, model, method)}")
                names = [naming.map_name(self.entities, model, method, p.label)
                         for p in self.param_specs(model)]
                names.append(naming.nrmse_name(self.entities, model, method))
                if method == "vaegmm":
                    names += [naming.dseg_name(self.entities, model, method),
                              naming.probseg_name(self.entities, model, method)]
                out += [f"missing {n}" for n in names if not self.dwi_path(n).is_file()]
        return out


def find_series(output_dir, subject: str) -> list[Series]:
    """Every series of ``subject`` with a summary record in ``output_dir``, sorted by prefix."""
    output_dir = Path(output_dir)
    subject = clean_label(subject)
    sub_dir = output_dir / f"sub-{subject}"
    paths = sorted(set(sub_dir.glob("log/*_summary.json")) | set(sub_dir.glob("ses-*/log/*_summary.json")))
    series = []
    for path in paths:
        summary = read_json(path)
        s = Series(output_dir, path, summary)
        if "subject" not in s.entities or s.entities.get("subject") is None:
            s.entities["subject"] = subject
        series.append(s)
    return sorted(series, key=lambda s: s.prefix)


def subjects_in_output(output_dir) -> list[str]:
    """Subjects with anything in ``output_dir``: a ``sub-<L>`` folder or a ``sub-<L>.html``."""
    output_dir = Path(output_dir)
    found = set()
    for p in output_dir.glob("sub-*"):
        m = _SUB_DIR.match(p.name[:-5] if p.name.endswith(".html") else p.name)
        if m and (p.is_dir() or p.suffix == ".html"):
            found.add(m.group(1))
    return sorted(found)


def subjects_in_bids(bids_dir) -> list[str]:
    """Subjects of a BIDS dataset (``sub-<L>`` folders)."""
    return sorted(m.group(1) for p in Path(bids_dir).glob("sub-*")
                  if p.is_dir() and (m := _SUB_DIR.match(p.name)))


def expected_prefixes(bids_dir, subject: str) -> list[str]:
    """Output prefixes of the DWI series of ``subject`` in a BIDS dataset."""
    sub_dir = Path(bids_dir) / f"sub-{clean_label(subject)}"
    prefixes = set()
    for path in list(sub_dir.glob("dwi/*_dwi.nii*")) + list(sub_dir.glob("ses-*/dwi/*_dwi.nii*")):
        ent = naming.parse(path.name)
        prefixes.add(naming.prefix({"subject": ent.get("sub"), "session": ent.get("ses"),
                                    "acquisition": ent.get("acq"), "run": ent.get("run"),
                                    "space": ent.get("space")}))
    return sorted(prefixes)
