"""A spatially structured phantom: tissues with sharp boundaries, smooth fields, texture, and the
edge-versus-interior map that spatial estimators are judged on.

Layouts (``layout``):

- ``"brain"``: an analytic, anatomy-like head of its own. An ellipsoidal brain whose surface is
  lobulated by a smooth random field, a CSF rim (sulcal CSF) inside the surface, a folded cortical
  grey-matter ribbon (gyri: a random sum of low-order angular harmonics moves its inner boundary),
  white matter inside, two lateral ventricles (CSF) and two deep grey nuclei (thalamus-like)
  inside the white matter. Every seed folds it differently.
- ``"mni"``: the MNI152 tissue layout of :func:`vaemap_bids.simulate.phantom.brain_anatomy`,
  hardened to its most probable tissue on a grid ``supersample`` times finer (another anatomy
  for held-out checks).
- ``"slab"``: two tissues (WM in the first half of axis 0, GM in the second) inside a box with one
  background voxel around it: with ``field = texture = 0`` a piecewise-constant phantom whose only
  structure is one plane boundary.

Partial volume: tissue labels are drawn on a grid ``supersample`` times finer along every axis and
block-averaged, so a voxel cut by a boundary holds the fraction of each tissue, and every other
voxel is pure (sharp boundaries, one voxel of partial volume at most).

Parameters: in tissue t, ``p_t(x) = mean_t * (1 + field * F_t(x)) * (1 + texture * E_t(x))``
with ``F_t`` a zero-mean unit-std smooth random field (:func:`.phantom.smooth_field`, about
``field_cycles`` oscillations across the grid) and ``E_t`` independent standard normal voxel
texture; a voxel's truth is the tissue-fraction-weighted mean of its tissues' values (the same
convention as :mod:`.phantom`), clipped 1 % inside the model's bounds; MS-DKI kurtosis is kept
below 95 % of the validity edge ``b_max D K < 3``. Ball-stick fibre directions are the smooth
field of :func:`.phantom.fibre_directions`. Tissue means default to :data:`.phantom.TISSUE_PARAMETERS`.

S0: ``tissue_s0[t]`` (fraction-weighted) times a smooth receive field ``1 + s0_field * F(x)``
(no texture): smooth within a tissue, stepping at boundaries as a T2-weighted b0 does.

Signal: ``S / s0_scale = S0(x) phi(b, g; truth(x))`` on the brain, 0 in the background; noise is
Rician with ``sigma = 1 / snr`` per channel on that scale (``snr`` is the b0 SNR of nominal WM).
The stored truth is exactly what made the signal.

Region map (:data:`REGION_LABELS`): an ``edge`` voxel is a brain voxel that shares a face with a voxel of another (dominant) tissue or background, or which holds less than
99 % of one tissue; every other brain voxel is ``interior``.

:func:`simulate_spatial` returns the arrays; :func:`write_spatial_dataset` writes them as a BIDS
dataset with the writers of :mod:`.phantom`.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .. import naming
from ..atomic import write_json_atomic, write_nifti_atomic
from ..physics.acquisition import Acquisition
from ..physics.base import get_model_class, make_model
from .acquisitions import hcp_acquisition
from .noise import add_rician_noise
from .phantom import (MSDKI_MARGIN, SEQUENCE, TISSUE_LABELS, TISSUE_PARAMETERS, TISSUE_S0,
                      Anatomy, _to_dtype, _write_truth, brain_anatomy, demo_acquisition,
                      fibre_directions, smooth_field, update_participants, write_dataset_description,
                      write_dwi_series)

TISSUES = ("GM", "WM", "CSF")
#: Values of the region map.
REGION_LABELS = {"background": 0, "interior": 1, "edge": 2}
LAYOUTS = ("brain", "mni", "slab")
#: A voxel holding less than this fraction of its main tissue is a partial-volume (edge) voxel.
PURE_FRACTION = 0.99


@dataclass
class SpatialPhantom:
    """Arrays of one simulated series (grid shape ``(X, Y, Z)``)."""

    model: str
    acquisition: Acquisition
    affine: np.ndarray
    probs: np.ndarray            # (3, X, Y, Z) tissue fractions, GM, WM, CSF
    mask: np.ndarray             # (X, Y, Z) bool: brain
    labels: np.ndarray           # (X, Y, Z) uint8: 0 bg, 1 GM, 2 WM, 3 CSF (dominant tissue)
    region: np.ndarray           # (X, Y, Z) uint8: REGION_LABELS
    truth: dict                  # {param: (X, Y, Z) or (X, Y, Z, 3)}, 0 outside the brain
    s0: np.ndarray               # (X, Y, Z) noiseless S0 / s0_scale
    clean: np.ndarray            # (X, Y, Z, T) noiseless S / s0_scale
    signal: np.ndarray           # (X, Y, Z, T) Rician magnitude / s0_scale
    snr: float
    seed: int
    settings: dict = dc_field(default_factory=dict)

    @property
    def sigma(self) -> float:
        """Noise sd per channel on the scale of ``signal``."""
        return 0.0 if np.isinf(self.snr) else 1.0 / self.snr

    def params(self) -> np.ndarray:
        """Truth of the brain voxels as a parameter array (N, n_params), mask C order."""
        cls = get_model_class(self.model)
        cols = [self.truth[p.label][self.mask] if p.is_direction
                else self.truth[p.label][self.mask][:, None] for p in cls.parameters]
        return np.concatenate(cols, axis=1)

    def voxel_coords(self) -> np.ndarray:
        """(N, 3) integer voxel indices of the brain voxels, mask C order (the rows)."""
        return np.argwhere(self.mask)

    def anatomy(self) -> Anatomy:
        return Anatomy(affine=self.affine, probs=self.probs, mask=self.mask, labels=self.labels)


# ---- layouts -------------------------------------------------------------------------------

def _fine_grid(shape, k: int) -> np.ndarray:
    """Centres of a grid ``k`` times finer, in coarse-voxel coordinates, shape (3, kX, kY, kZ)."""
    axes = [(np.arange(s * k) + 0.5) / k - 0.5 for s in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _block_fractions(fine_labels: np.ndarray, shape, k: int) -> np.ndarray:
    """(3, X, Y, Z) fractions of labels 1..3 (GM, WM, CSF) in each k^3 block."""
    out = np.empty((3, *shape))
    for t, tissue in enumerate(TISSUES):
        hit = (fine_labels == TISSUE_LABELS[tissue]).astype(np.float64)
        out[t] = hit.reshape(shape[0], k, shape[1], k, shape[2], k).mean(axis=(1, 3, 5))
    return out


def _harmonics(u: np.ndarray, rng: np.random.Generator, n_terms: int, max_order: int) -> np.ndarray:
    """A random sum of low-order angular harmonics of the unit directions ``u`` (3, ...), with
    unit-ish amplitude (cosines of random planes wave through the sphere)."""
    out = np.zeros(u.shape[1:])
    for _ in range(n_terms):
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        order = rng.integers(2, max_order + 1)
        phase = rng.uniform(0, 2 * np.pi)
        cos_t = np.tensordot(axis, u, axes=1)
        out += np.cos(order * np.arccos(np.clip(cos_t, -1, 1)) + phase)
    return out / np.sqrt(n_terms / 2.0)


def brain_layout(shape, rng: np.random.Generator, supersample: int = 3) -> np.ndarray:
    """Labels (0 bg, 1 GM, 2 WM, 3 CSF) of the analytic brain on the fine grid."""
    shape = tuple(int(s) for s in shape)
    k = int(supersample)
    g = _fine_grid(shape, k)
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
    radius = (np.asarray(shape, dtype=np.float64) - 2) / 2.0   # a one-voxel margin
    x = (g - centre[:, None, None, None]) / radius[:, None, None, None]
    rho = np.sqrt((x ** 2).sum(axis=0))
    u = x / np.maximum(rho, 1e-9)
    surface = 1.0 - 0.06 * (1 + _harmonics(u, rng, 4, 3)) / 2.0       # lobulation, <= 1
    folds = _harmonics(u, rng, 10, 7)                                   # gyri and sulci
    r = rho / surface
    labels = np.zeros(rho.shape, dtype=np.uint8)
    brain = r < 1.0
    labels[brain] = TISSUE_LABELS["CSF"]                                # sulcal rim
    inner = 0.70 + 0.09 * folds                                         # WM/GM boundary
    labels[brain & (r < 0.90)] = TISSUE_LABELS["GM"]
    labels[brain & (r < inner)] = TISSUE_LABELS["WM"]
    # two lateral ventricles and two deep grey nuclei, mirrored across axis 0
    off = rng.uniform(-0.05, 0.05, 3)
    for side in (-1.0, 1.0):
        v = (x - np.array([0.16 * side, 0.05, 0.05])[:, None, None, None] - off[:, None, None, None])
        vent = (v[0] / 0.09) ** 2 + (v[1] / 0.30) ** 2 + (v[2] / 0.16) ** 2 < 1.0
        labels[brain & vent] = TISSUE_LABELS["CSF"]
        n = (x - np.array([0.20 * side, -0.12, -0.18])[:, None, None, None] - off[:, None, None, None])
        nucleus = (n[0] / 0.13) ** 2 + (n[1] / 0.17) ** 2 + (n[2] / 0.13) ** 2 < 1.0
        labels[brain & nucleus & (labels == TISSUE_LABELS["WM"])] = TISSUE_LABELS["GM"]
    return labels


def slab_layout(shape, supersample: int = 3) -> np.ndarray:
    """Two tissues split by the plane at the middle of axis 0 (WM below, GM above), inside a box
    with a one-voxel background margin."""
    shape = tuple(int(s) for s in shape)
    k = int(supersample)
    g = _fine_grid(shape, k)
    inside = np.all([(g[a] > 0.5) & (g[a] < shape[a] - 1.5) for a in range(3)], axis=0)
    labels = np.zeros(g.shape[1:], dtype=np.uint8)
    split = (shape[0] - 1) / 2.0
    labels[inside & (g[0] < split)] = TISSUE_LABELS["WM"]
    labels[inside & (g[0] >= split)] = TISSUE_LABELS["GM"]
    return labels


def mni_layout(shape, rng: np.random.Generator, supersample: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 layout hardened on the fine grid, and the coarse grid's affine."""
    shape = tuple(int(s) for s in shape)
    k = int(supersample)
    fine = brain_anatomy(tuple(s * k for s in shape), scale=float(rng.uniform(0.96, 1.04)),
                         shift_vox=rng.uniform(-1.0, 1.0, 3) * k)
    affine = fine.affine @ np.diag([k, k, k, 1.0])
    affine[:3, 3] = fine.affine[:3, :3] @ np.full(3, (k - 1) / 2.0) + fine.affine[:3, 3]
    return fine.labels, affine


_FACES = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


def region_map(probs: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0 background, 1 interior, 2 edge (see the module docstring)."""
    edge = np.zeros(mask.shape, dtype=bool)
    padded = np.pad(labels, 1, mode="constant", constant_values=0)
    sx, sy, sz = mask.shape
    for dx, dy, dz in _FACES:
        other = padded[1 + dx:1 + dx + sx, 1 + dy:1 + dy + sy, 1 + dz:1 + dz + sz]
        edge |= other != labels
    edge |= probs.max(axis=0) < PURE_FRACTION
    out = np.zeros(mask.shape, dtype=np.uint8)
    out[mask] = REGION_LABELS["interior"]
    out[mask & edge] = REGION_LABELS["edge"]
    return out


def _isotropic_affine(shape, voxel_mm: float = 2.0) -> np.ndarray:
    affine = np.diag([-voxel_mm, voxel_mm, voxel_mm, 1.0])   # LAS, as the other phantom
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


# ---- the simulation ------------------------------------------------------------------------

def _check(model, layout, snr, field, texture, s0_field, supersample):
    if model not in TISSUE_PARAMETERS:
        raise ValueError(f"model must be one of {sorted(TISSUE_PARAMETERS)}, got {model!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if not float(snr) > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    for name, value in (("field", field), ("texture", texture), ("s0_field", s0_field)):
        if not (np.isfinite(value) and 0 <= value < 0.5):
            raise ValueError(f"{name} is a relative standard deviation in [0, 0.5), got {value}")
    if int(supersample) < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")


def simulate_spatial(model: str = "msdki", shape=(32, 36, 28), *, layout: str = "brain",
                     acquisition: Acquisition | None = None, snr: float = 20.0, seed: int = 0,
                     field: float = 0.08, texture: float = 0.05, field_cycles: float = 2.0,
                     s0_field: float = 0.05, tissue_parameters: dict | None = None,
                     tissue_s0: dict | None = None, supersample: int = 3) -> SpatialPhantom:
    """Simulate one series of the structured phantom (see the module docstring).

    ``acquisition`` defaults to :func:`.phantom.demo_acquisition` (6 b0, 20 directions at b = 1000
    and 2000 s/mm^2). ``tissue_parameters`` ``{tissue: {param: mean}}`` and ``tissue_s0``
    override the defaults of :mod:`.phantom` (missing entries keep them). The same arguments
    give identical arrays; the layout, parameter fields, texture and noise come from separate
    streams of ``seed``, so changing ``snr`` changes the noise scale only, and changing
    ``texture`` leaves the layout and the smooth fields as they are."""
    _check(model, layout, snr, field, texture, s0_field, supersample)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 6:
        raise ValueError(f"shape must be three sizes of at least 6 voxels, got {shape}")
    acq = acquisition if acquisition is not None else demo_acquisition()
    if not acq.b0_mask.any():
        raise ValueError("the phantom's acquisition needs at least one b0 volume")
    b_max = float(acq.bvals.max())
    layout_rng, field_rng, texture_rng, dir_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))

    k = int(supersample)
    if layout == "brain":
        fine, affine = brain_layout(shape, layout_rng, k), _isotropic_affine(shape)
    elif layout == "slab":
        fine, affine = slab_layout(shape, k), _isotropic_affine(shape)
    else:
        fine, affine = mni_layout(shape, layout_rng, k)
    probs = _block_fractions(fine, shape, k)
    total = probs.sum(axis=0)
    mask = total >= 0.5
    if not mask.any():
        raise ValueError(f"shape {shape} holds no brain voxel")
    labels = np.zeros(shape, dtype=np.uint8)
    dominant = np.array([TISSUE_LABELS[t] for t in TISSUES], dtype=np.uint8)[probs.argmax(axis=0)]
    labels[mask] = dominant[mask]
    weights = np.where(mask, probs / np.maximum(total, 1e-12), 0.0)
    region = region_map(weights, mask, labels)

    means = {t: dict(TISSUE_PARAMETERS[model][t]) for t in TISSUES}
    for t, values in (tissue_parameters or {}).items():
        if t not in means:
            raise ValueError(f"tissue_parameters: unknown tissue {t!r}; use {list(TISSUES)}")
        means[t].update(values)
    s0_of = {**TISSUE_S0, **(tissue_s0 or {})}

    cls = get_model_class(model)
    truth = {}
    for spec in cls.parameters:
        if spec.is_direction:
            continue
        value = np.zeros(shape)
        for t, tissue in enumerate(TISSUES):
            f = smooth_field(shape, field_rng, field_cycles)
            e = texture_rng.standard_normal(shape)
            value += weights[t] * means[tissue][spec.label] * (1 + field * f) * (1 + texture * e)
        lo = spec.lo + 0.01 * (spec.hi - spec.lo)
        hi = spec.hi - 0.01 * (spec.hi - spec.lo)
        truth[spec.label] = np.where(mask, np.clip(value, lo, hi), 0.0)
    if model == "msdki":
        k_edge = MSDKI_MARGIN * 3.0 / (b_max * np.maximum(truth["msd"], 1e-6))
        truth["msk"] = np.where(mask, np.minimum(truth["msk"], k_edge), 0.0)
    if model == "ballstick":
        anat = Anatomy(affine=affine, probs=weights, mask=mask, labels=labels)
        truth["dir"] = np.where(mask[..., None], fibre_directions(anat, dir_rng), 0.0)

    s0 = sum(weights[t] * s0_of[tissue] for t, tissue in enumerate(TISSUES))
    s0 = np.where(mask, s0 * (1 + s0_field * smooth_field(shape, field_rng, 1.0)), 0.0)

    forward_model = make_model(model, hcp_acquisition())
    cols = [truth[p.label][mask] if p.is_direction else truth[p.label][mask][:, None]
            for p in cls.parameters]
    params = np.concatenate(cols, axis=1)
    if model == "msdki" and np.any(b_max * params[:, 0] * params[:, 1] >= 3.0):
        raise RuntimeError("phantom voxels outside MS-DKI's domain")  # guarded by the cap above
    clean = np.zeros((*shape, acq.n_volumes))
    clean[mask] = s0[mask, None] * forward_model.forward_numpy(params, acq.bvals, acq.bvecs)
    signal = add_rician_noise(clean, snr, noise_rng)
    settings = {"layout": layout, "shape": list(shape), "field": field, "texture": texture,
                "field_cycles": field_cycles, "s0_field": s0_field, "supersample": k,
                "tissue_parameters": means, "tissue_s0": s0_of,
                "noise": "Rician, sigma = 1 / snr per channel (S0 of nominal WM = 1)"}
    return SpatialPhantom(model=model, acquisition=acq, affine=affine, probs=weights, mask=mask,
                          labels=labels, region=region, truth=truth, s0=s0, clean=clean,
                          signal=signal, snr=float(snr), seed=int(seed), settings=settings)


# ---- BIDS ----------------------------------------------------------------------------------

def write_spatial_dataset(bids_dir, truth_dir, *, subjects=("01",), model: str = "msdki",
                          shape=(32, 36, 28), acquisition: Acquisition | None = None,
                          snr: float = 20.0, seed: int = 0, dtype: str = "int16",
                          s0_scale: float = 1000.0, **options) -> dict:
    """Write :func:`simulate_spatial` series (one per subject, seeds spawned from ``seed``) as a
    BIDS raw dataset in ``bids_dir`` and their truth (the same files as
    :func:`.phantom.write_phantom_dataset`, plus ``desc-region_dseg``) in ``truth_dir``.
    ``options`` go to :func:`simulate_spatial`. Returns ``{"bids_dir", "truth_dir",
    "truth_json", "series": [{"entities", "dwi", "bval", "bvec", "json", "truth", "mask",
    "dseg", "probseg", "s0", "region"}]}``."""
    bids_dir, truth_dir = Path(bids_dir).absolute(), Path(truth_dir).absolute()
    if truth_dir == bids_dir or bids_dir in truth_dir.parents:
        raise ValueError(f"truth_dir {truth_dir} must be outside the BIDS folder {bids_dir}")
    if dtype == "int16" and s0_scale * max(TISSUE_S0.values()) * 1.3 * (1 + 6.0 / snr) > 32767:
        raise ValueError(f"s0_scale = {s0_scale} would overflow int16; lower it or use float32")
    subjects = [naming.check_label(s, "subject") for s in
                ([subjects] if isinstance(subjects, str) else subjects)]
    acq = acquisition if acquisition is not None else demo_acquisition()
    bids_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    out = {"bids_dir": bids_dir, "truth_dir": truth_dir, "series": [],
           "dataset_description": write_dataset_description(
               bids_dir, "vaemap spatially structured DWI phantom",
               {"GeneratedBy": [{"Name": "vaemap spatial phantom",
                                 "Description": "vaemap_bids.simulate.spatial.write_spatial_dataset"}]})}
    forward_model = make_model(model, hcp_acquisition())
    record = {"model": model, "seed": int(seed), "snr": float(snr), "s0_scale": float(s0_scale),
              "dtype": dtype, "region_labels": REGION_LABELS, "tissue_labels": TISSUE_LABELS,
              "units": {p.label: p.units for p in forward_model.parameters}, "series": []}
    seeds = np.random.SeedSequence(seed).generate_state(len(subjects))
    for subject, sub_seed in zip(subjects, seeds):
        ph = simulate_spatial(model, shape, acquisition=acq, snr=snr, seed=int(sub_seed), **options)
        record.setdefault("settings", ph.settings)
        entities = {"subject": subject, "session": None, "acquisition": None, "run": None}
        data = _to_dtype(ph.signal * float(s0_scale), dtype)
        dwi = (bids_dir / naming.subject_dir(entities) / "dwi"
               / f"{naming.prefix(entities)}_dwi.nii.gz")
        sidecar = {**SEQUENCE, "SeriesDescription": f"vaemap spatial phantom ({model}, SNR {snr:g})",
                   "ScanningSequence": "EP", "SequenceVariant": "SK", "MRAcquisitionType": "2D"}
        paths = write_dwi_series(dwi, data, ph.affine, acq.bvals * 1e3, acq.bvecs, sidecar,
                                 tr=SEQUENCE["RepetitionTime"])
        series = {"entities": {"subject": subject}, **paths}
        series.update(_write_truth(truth_dir, entities, model, forward_model, ph.truth,
                                   ph.anatomy(), ph.s0 * s0_scale))
        region_img = nib.Nifti1Image(ph.region.astype(np.uint8), ph.affine)
        region_img.set_qform(ph.affine, code=1)
        region_img.set_sform(ph.affine, code=1)
        series["region"] = write_nifti_atomic(
            truth_dir / naming.subject_dir(entities) / "dwi"
            / f"{naming.prefix(entities)}_desc-region_dseg.nii.gz", region_img)
        out["series"].append(series)
        record["series"].append({"entities": {"subject": subject}, "seed": int(sub_seed),
                                 "dwi": str(Path(paths["dwi"]).relative_to(bids_dir)),
                                 "n_brain_voxels": int(ph.mask.sum()),
                                 "n_edge_voxels": int((ph.region == REGION_LABELS["edge"]).sum())})
    out["participants"] = update_participants(
        bids_dir, [{"participant_id": f"sub-{s}"} for s in subjects])
    out["truth_json"] = write_json_atomic(truth_dir / "truth.json", record)
    return out


__all__ = ["LAYOUTS", "REGION_LABELS", "SpatialPhantom", "simulate_spatial",
           "write_spatial_dataset", "region_map", "brain_layout", "slab_layout"]
