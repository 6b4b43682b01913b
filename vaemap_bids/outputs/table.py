"""The derivatives table: every kind of file vaemap writes, and which files one fit or one series
produces.

A :class:`Kind` fixes a file's folder, fixed entities, suffix, extension, data type and whether
the group level requires it; :func:`fit_outputs` and :func:`series_outputs` derive the files from
a model's parameter specs and an estimator's outputs (``fitting.base.ESTIMATORS``). The writers,
the group level's completeness check and the reports all iterate these lists, so a new output
kind is one row here (and its product in :mod:`vaemap_bids.outputs.products`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import naming
from ..fitting.base import get_estimator
from ..physics import get_model_class


@dataclass(frozen=True)
class Kind:
    key: str
    folder: str                     # under sub-<L>[/ses-<S>]/: dwi (derivatives) or log (records)
    suffix: str
    extension: str
    fixed: dict = field(default_factory=dict)   # entities every file of the kind has
    dtype: str | None = None        # data type of an image kind
    required: bool = True           # the group level counts a series incomplete without it
    what: str = ""

    @property
    def is_image(self) -> bool:
        return self.extension in (".nii.gz", ".nii")


KINDS: dict[str, Kind] = {k.key: k for k in (
    Kind("mask", "dwi", "mask", ".nii.gz", {"desc": "brain"}, "uint8",
         what="brain mask used for fitting"),
    Kind("valid_mask", "dwi", "mask", ".nii.gz", {"desc": "valid"}, "uint8",
         what="brain-mask voxels with a fitted estimate (1); excluded or failed voxels (0)"),
    Kind("param", "dwi", "dwimap", ".nii.gz", dtype="float32", what="parameter map"),
    Kind("std", "dwi", "dwimap", ".nii.gz", {"stat": "std"}, "float32",
         what="standard deviation of the estimate"),
    Kind("nrmse", "dwi", "dwimap", ".nii.gz", {"stat": "nrmse"}, "float32",
         what="normalised RMS residual of the fit"),
    Kind("dseg", "dwi", "dseg", ".nii.gz", dtype="int16", what="hard clusters 1..K"),
    Kind("dseg_tsv", "dwi", "dseg", ".tsv", what="cluster label table"),
    Kind("probseg", "dwi", "probseg", ".nii.gz", dtype="float32",
         what="cluster responsibilities, one volume per component"),
    Kind("latent", "log", "latent", ".npz", required=False,
         what="posterior means of a voxel subsample"),
    Kind("fit_record", "log", "fit", ".json",
         what="hyper-parameters, training history, timings, counts (written last)"),
    Kind("summary", "log", "summary", ".json", what="inputs, mask, models and what ran"),
    Kind("denoised", "dwi", "dwi", ".nii.gz", {"desc": "denoised"}, "float32", required=False,
         what="the denoised series the fits read (--denoise with --denoise-output only)"),
)}

#: Entities a derivative may add to the series' own.
_DERIVATIVE_ENTITIES = ("model", "desc", "param", "stat")


@dataclass(frozen=True)
class Output:
    """One file: a kind and its full entities."""

    kind: str
    entities: dict

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    @property
    def name(self) -> str:
        return naming.build_name({**self.entities, **self.spec.fixed}, self.spec.suffix,
                                 self.spec.extension)

    @property
    def path(self) -> str:
        """Relative to OUTPUT_DIR."""
        return f"{naming.subject_dir(self.entities)}/{self.spec.folder}/{self.name}"

    @property
    def sidecar_path(self) -> str | None:
        """The JSON sidecar of an image (None for other kinds)."""
        return naming.sidecar(self.path) if self.spec.is_image else None

    @property
    def required(self) -> bool:
        return self.spec.required


def output(kind: str, series: dict, *, model: str | None = None, method: str | None = None,
           param: str | None = None) -> Output:
    """The file of ``kind`` for a series (``{"subject": ..., "session": ...}``) and, for fit
    outputs, a model, method and parameter."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(KINDS)}")
    ents = naming.series_entities(series)
    for key, value in (("model", model), ("desc", method), ("param", param)):
        if value is not None:
            ents[key] = value
    return Output(kind, ents)


def fit_outputs(series: dict, model: str, method: str) -> list[Output]:
    """Every file one (model, method) fit of a series produces, the fit record last."""
    specs = get_model_class(model).parameters
    extra = get_estimator(method).outputs
    out = [output("param", series, model=model, method=method, param=p.label) for p in specs]
    if "std" in extra:
        out += [output("std", series, model=model, method=method, param=p.label)
                for p in specs if not p.is_direction]
    out.append(output("nrmse", series, model=model, method=method))
    if "responsibilities" in extra:
        out += [output(k, series, model=model, method=method)
                for k in ("dseg", "dseg_tsv", "probseg")]
    if "latent" in extra:
        out.append(output("latent", series, model=model, method=method))
    out.append(output("fit_record", series, model=model, method=method))
    return out


def series_outputs(series: dict) -> list[Output]:
    """The files of a series that do not belong to one fit (the summary is written last)."""
    return [output(k, series) for k in ("mask", "valid_mask", "summary")]
