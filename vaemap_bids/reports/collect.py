"""Find and read what the participant workflow wrote, by the derivatives table
(:mod:`vaemap_bids.outputs.table`).

One :class:`Series` is one input DWI series (one ``<prefix>_summary.json``). Images are returned in
the closest canonical (RAS+) orientation, so that every figure is drawn the same way whatever the
input's orientation; maps are NaN where the validity mask says no estimate exists (they are 0
there on disk), so that every statistic skips those voxels.
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
from ..fitting.base import ESTIMATORS, METHODS
from ..outputs.table import fit_outputs, output, series_outputs
from ..physics import get_model_class

#: Methods with a latent space (their fit gives latent means).
VAE_METHODS = tuple(name for name, e in ESTIMATORS.items() if "latent" in e.outputs)
_SUB_DIR = re.compile(r"^sub-([A-Za-z0-9]+)$")


def sort_methods(methods) -> list[str]:
    """Methods in the registry's order (lsq, ssl, vaeunig, vaegmm, ...), unknown ones last."""
    rank = {m: i for i, m in enumerate(METHODS)}
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
    def path(self, kind: str, model: str | None = None, method: str | None = None,
             param: str | None = None) -> Path:
        return self.output_dir / output(kind, self.entities, model=model, method=method,
                                        param=param).path

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
            path = self.path("fit_record", model, method)
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
    def _image(self, kind: str, model=None, method=None, param=None) -> np.ndarray | None:
        key = ("img", kind, model, method, param)
        if key not in self._cache:
            path = self.path(kind, model, method, param)
            self._cache[key] = load_canonical(path) if path.is_file() else None
        return self._cache[key]

    def mask(self) -> np.ndarray | None:
        data = self._image("mask")
        return None if data is None else data > 0

    def valid(self) -> np.ndarray | None:
        """Voxels with an estimate (the validity mask; the brain mask when it is missing)."""
        data = self._image("valid_mask")
        return self.mask() if data is None else data > 0

    def _estimate(self, kind: str, model, method, param=None):
        data = self._image(kind, model, method, param)
        valid = self.valid()
        if data is None or valid is None:
            return data
        inside = valid if data.ndim == 3 else valid[..., None]
        return np.where(inside, data, np.float32(np.nan))

    def map(self, model: str, method: str, param: str, stat: str | None = None):
        return self._estimate("std" if stat == "std" else "param", model, method, param)

    def nrmse(self, model: str, method: str):
        return self._estimate("nrmse", model, method)

    def dseg(self, model: str, method: str = "vaegmm"):
        return self._image("dseg", model, method)

    def probseg(self, model: str, method: str = "vaegmm"):
        return self._image("probseg", model, method)

    def latent(self, model: str, method: str) -> dict | None:
        path = self.path("latent", model, method)
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
        expected = [o for o in series_outputs(self.entities) if o.kind != "summary"]
        for model, info in self.models.items():
            status = info.get("status")
            if status == "skipped":
                continue
            if status != "ran":
                out.append(f"model {model}: status {status!r}"
                           + (f" ({info['reason']})" if info.get("reason") else ""))
                continue
            for method in sort_methods(info.get("methods") or []):
                try:
                    expected += fit_outputs(self.entities, model, method)
                except ValueError as exc:  # a model or method this version does not know
                    out.append(f"model {model}, method {method}: {exc}")
        for o in expected:
            if o.required and not (self.output_dir / o.path).is_file():
                out.append(f"missing {o.name}")
        return out


def find_series(output_dir, subject: str) -> list[Series]:
    """Every series of ``subject`` with a summary record in ``output_dir``, sorted by prefix."""
    output_dir = Path(output_dir)
    subject = naming.clean_label(subject, "sub")
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
    sub_dir = Path(bids_dir) / f"sub-{naming.clean_label(subject, 'sub')}"
    prefixes = set()
    for path in list(sub_dir.glob("dwi/*_dwi.nii*")) + list(sub_dir.glob("ses-*/dwi/*_dwi.nii*")):
        prefixes.add(naming.prefix(naming.parse_series_entities(path.name)))
    return sorted(prefixes)
