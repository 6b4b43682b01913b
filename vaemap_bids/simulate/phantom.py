"""A small synthetic BIDS dataset with brain-like anatomy and a known truth.

Anatomy: the MNI152 2009a grey- and white-matter probability maps that ship inside nilearn (no
download) are resampled onto a small grid; CSF is what the filled brain envelope holds besides
grey and white matter (ventricles and the sulcal rim). Every subject gets a slightly different
brain (a random global scale of +-4 % and a shift of up to one voxel).

Grid: an isotropic voxel just large enough for the brain (1 voxel margin), centred on it, in the
orientation ``orientation`` (default LAS: the first voxel axis runs right -> left, so the
affine has a negative determinant, which is also FSL's "radiological" convention, where the
bvec frame equals the voxel-axis frame). Any nibabel axis code (e.g. "RAS", "LPI") works;
``oblique_deg`` tilts the grid (about x by that angle, then about z by half of it), as an
oblique acquisition does.

Parameters: each tissue (GM, WM, CSF) has nominal values (:data:`TISSUE_PARAMETERS`), modulated
by its own smooth random field (+-8 % std, a few cycles across the brain); a voxel's truth is the
tissue-probability-weighted mean of the three, so partial volume gives smooth transitions. For
ball-stick, fibre directions vary smoothly: left-right near the midline (corpus-callosum-like),
inferior-superior laterally (corona-radiata-like), plus a smooth random perturbation; they are
expressed in the frame of the written ``.bvec`` file (FSL convention: voxel axes, x flipped when
the affine's determinant is positive), so the stored truth is exactly what made the signal.
MS-DKI kurtosis is kept physical at the acquisition's largest b (``b_max D K < 3`` with a 5 %
margin), over every volume of the acquisition, since the MS-DKI formula makes all of them.

Signal: ``S = S0 * phi(b, g; truth)`` with a tissue-dependent S0 (WM 1, GM 1.15, CSF 1.8 times
``s0``, times a smooth +-5 % receive field); background has S0 = 0, so it is pure Rician
(Rayleigh) noise. Noise: Rician with ``sigma = s0 / snr`` in both channels, i.e. ``snr`` is the
b0 SNR of nominal white matter. Stored as int16 (rounded, clipped to [0, 32767]) or float32.

The truth lives in ``truth_dir``, outside the BIDS folder: parameter maps named like vaemap's
derivatives with method label ``truth`` (the derivatives table's names), the brain mask,
tissue labels (``dseg``: 0 background, 1 GM, 2 WM, 3 CSF, as fMRIPrep numbers them) and
probabilities, the noiseless S0 map, and ``truth.json`` describing all of it. For a ball-stick
phantom the small-b cumulant limit of its direction-averaged signal is also written as MS-DKI
maps with method label ``cumulant`` (D = mean apparent diffusivity, K = 3 var / D^2): what an
MS-DKI fit of that signal approaches as b -> 0, not what generated the signal.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt
from scipy import ndimage

from .. import naming
from ..atomic import write_json_atomic, write_nifti_atomic, write_text_atomic
from ..outputs.table import output
from ..physics.acquisition import Acquisition
from ..physics.base import get_model_class, make_model
from .acquisitions import hcp_acquisition
from .noise import add_rician_noise

#: Tissue labels of the ``dseg`` truth map (fMRIPrep's numbering).
TISSUE_LABELS = {"GM": 1, "WM": 2, "CSF": 3}
#: Nominal tissue parameters per model (vaemap units: um^2/ms). ``dir`` is set by the fibre field.
TISSUE_PARAMETERS = {
    "msdki": {"WM": {"msd": 0.85, "msk": 1.25}, "GM": {"msd": 1.05, "msk": 0.80},
              "CSF": {"msd": 2.90, "msk": 0.05}},
    "ballstick": {"WM": {"stickfrac": 0.60, "dpar": 1.70, "diso": 0.80},
                  "GM": {"stickfrac": 0.25, "dpar": 1.50, "diso": 0.95},
                  "CSF": {"stickfrac": 0.02, "dpar": 2.00, "diso": 2.90}},
}
#: b0 signal of each tissue relative to white matter (T2 weighting at a typical TE).
TISSUE_S0 = {"WM": 1.0, "GM": 1.15, "CSF": 1.8}
#: Relative standard deviation of the smooth parameter fields and of the receive field.
PARAMETER_VARIATION = 0.08
RECEIVE_FIELD_VARIATION = 0.05
#: MS-DKI truth keeps b_max D K below this fraction of the validity edge 3.
MSDKI_MARGIN = 0.95
#: Plausible sequence parameters for the sidecars (a 3 T single-band EPI).
SEQUENCE = {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.0503, "RepetitionTime": 3.5,
            "EchoTime": 0.081, "MagneticFieldStrength": 3, "FlipAngle": 90}
_NILEARN_FILES = {"GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
_INT16_MAX = 32767


# ---- file helpers (every write is atomic: a hidden temp file in the target folder, renamed) ---

def write_dataset_description(bids_dir, name: str, extra: dict | None = None) -> Path:
    """A raw dataset's ``dataset_description.json``, unless one is already there."""
    path = Path(bids_dir) / "dataset_description.json"
    if not path.exists():
        desc = {"Name": name, "BIDSVersion": "1.10.0", "DatasetType": "raw",
                "License": "CC0", "Authors": ["vaemap developers"]}
        desc.update(extra or {})
        write_json_atomic(path, desc)
    return path


def update_participants(bids_dir, rows: list[dict]) -> Path:
    """Add (or replace) rows of ``participants.tsv``, keyed by ``participant_id``, keeping the
    others; columns are the union, in first-seen order, with ``n/a`` where a row has no value."""
    path = Path(bids_dir) / "participants.tsv"
    existing: list[dict] = []
    if path.exists():
        with open(path, newline="") as fh:
            existing = list(csv.DictReader(fh, delimiter="\t"))
    by_id = {r["participant_id"]: r for r in existing}
    for row in rows:
        by_id[row["participant_id"]] = {**by_id.get(row["participant_id"], {}), **row}
    columns = ["participant_id"]
    for r in by_id.values():
        columns += [c for c in r if c not in columns]
    lines = ["\t".join(columns)]
    for pid in sorted(by_id):
        lines.append("\t".join(str(by_id[pid].get(c, "n/a")) for c in columns))
    return write_text_atomic(path, "\n".join(lines) + "\n")


def write_dwi_series(dwi_path, data: np.ndarray, affine: np.ndarray, bvals_smm2: np.ndarray,
                     bvecs: np.ndarray, sidecar: dict, *, tr: float | None = None) -> dict:
    """Write ``..._dwi.nii.gz`` with its ``.bval`` (s/mm^2, one row), ``.bvec`` (3 rows) and
    ``.json``; returns the four paths."""
    dwi_path = Path(dwi_path)
    if not dwi_path.name.endswith("_dwi.nii.gz"):
        raise ValueError(f"a BIDS DWI file name ends with _dwi.nii.gz, got {dwi_path.name}")
    if data.ndim != 4 or data.shape[3] != len(bvals_smm2) or np.shape(bvecs) != (len(bvals_smm2), 3):
        raise ValueError(f"data {data.shape}, {len(bvals_smm2)} b-values and bvecs "
                         f"{np.shape(bvecs)} do not describe the same volumes")
    stem = str(dwi_path)[: -len(".nii.gz")]
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    img.header.set_zooms((*zooms, float(tr if tr is not None else 1.0)))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    paths = {"dwi": write_nifti_atomic(dwi_path, img)}
    paths["bval"] = write_text_atomic(stem + ".bval",
                                      " ".join(f"{b:g}" for b in np.round(bvals_smm2, 1)) + "\n")
    paths["bvec"] = write_text_atomic(
        stem + ".bvec", "\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.asarray(bvecs).T)
        + "\n")
    paths["json"] = write_json_atomic(stem + ".json", sidecar)
    return paths


# ---- acquisition ---------------------------------------------------------------------------

def _hemisphere_directions(n: int, offset: float = 0.0) -> np.ndarray:
    """``n`` evenly spread unit vectors on the upper hemisphere (a Fibonacci lattice; ``offset``
    in [0, 1) rotates it about z, so that two shells do not share directions)."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n  # equal-area rings from the pole to the equator
    phi = 2 * np.pi * (i * (3.0 - np.sqrt(5.0)) / 2.0 + offset)
    r = np.sqrt(1.0 - z ** 2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def demo_acquisition(shells_smm2=(1000.0, 2000.0), n_directions: int = 20, n_b0: int = 6,
                     interleave: bool = True) -> Acquisition:
    """A small multi-shell table: ``n_b0`` b0 and ``n_directions`` directions on every shell
    (a different spread set per shell). ``interleave`` spreads the b0 evenly among the weighted
    volumes and alternates the shells, as scanners do; otherwise b0 first, then shell by shell."""
    if n_b0 < 1 or n_directions < 1 or not len(shells_smm2):
        raise ValueError("the demo acquisition needs at least one b0, one shell and one direction")
    shells = [(float(b), _hemisphere_directions(n_directions, i / len(shells_smm2) / n_directions))
              for i, b in enumerate(shells_smm2)]
    if interleave:
        weighted = [(b, dirs[j]) for j in range(n_directions) for b, dirs in shells]
    else:
        weighted = [(b, d) for b, dirs in shells for d in dirs]
    n_w = len(weighted)
    b0_at = set(np.round(np.linspace(0, n_w + n_b0 - 1, n_b0)).astype(int)) if interleave \
        else set(range(n_b0))
    bvals, bvecs, it = [], [], iter(weighted)
    for i in range(n_w + n_b0):
        if i in b0_at:
            bvals.append(0.0)
            bvecs.append((0.0, 0.0, 0.0))
        else:
            b, d = next(it)
            bvals.append(b)
            bvecs.append(tuple(d))
    return Acquisition.from_smm2(np.array(bvals), np.array(bvecs))


# ---- anatomy -------------------------------------------------------------------------------

@dataclass
class Anatomy:
    """Tissue probabilities on the phantom grid; ``probs`` is (3, X, Y, Z) in GM, WM, CSF order."""

    affine: np.ndarray
    probs: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


def _nilearn_data_dir() -> Path:
    # Found without importing nilearn.datasets (which pulls in scikit-learn: ~2 s).
    spec = find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed: the phantom's anatomy comes from its MNI152 maps")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


_TEMPLATE_CACHE: dict = {}


def _template_2mm() -> tuple[np.ndarray, np.ndarray]:
    """GM, WM, CSF probabilities of MNI152 2009a at 2 mm, and their affine (cached)."""
    if "probs" not in _TEMPLATE_CACHE:
        data_dir = _nilearn_data_dir()
        maps, affine = [], None
        for tissue in ("GM", "WM"):
            img = nib.load(data_dir / _NILEARN_FILES[tissue])
            vol = np.asarray(img.dataobj, dtype=np.uint16)
            # 2x2x2 block means: 1 mm -> 2 mm, an anti-aliased start for any target size.
            n = [s // 2 for s in vol.shape]
            total = sum(vol[i:2 * n[0]:2, j:2 * n[1]:2, k:2 * n[2]:2]
                        for i in (0, 1) for j in (0, 1) for k in (0, 1))
            maps.append(total.astype(np.float32) / (8 * 255.0))
            affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
            affine[:3, 3] += img.affine[:3, :3] @ np.full(3, 0.5)
        gm, wm = maps
        tissue = gm + wm
        # The brain envelope: GM+WM closed and filled (ventricles), grown by 2 mm (sulcal CSF).
        envelope = ndimage.binary_fill_holes(ndimage.binary_closing(tissue > 0.3, iterations=3))
        envelope = ndimage.binary_dilation(envelope, iterations=1)
        csf = np.where(envelope, np.clip(1.0 - tissue, 0.0, 1.0), 0.0).astype(np.float32)
        _TEMPLATE_CACHE["probs"] = np.stack([gm, wm, csf])
        _TEMPLATE_CACHE["affine"] = affine
    return _TEMPLATE_CACHE["probs"], _TEMPLATE_CACHE["affine"]


def _orientation(orientation: str) -> np.ndarray:
    """nibabel's (voxel axis -> world axis, sign) table for three axis codes such as 'LAS'."""
    try:
        ornt = axcodes2ornt(tuple(str(orientation).upper()))
    except ValueError:
        ornt = None
    if ornt is None or len(ornt) != 3 or np.isnan(ornt).any() or len(set(ornt[:, 0])) != 3:
        raise ValueError(f"orientation must be three nibabel axis codes, one per world axis, "
                         f"such as 'LAS' or 'RAS'; got {orientation!r}")
    return ornt


def oblique_rotation(oblique_deg: float) -> np.ndarray:
    """The world rotation of an oblique grid: about x by ``oblique_deg``, then about z by half."""
    a, b = np.deg2rad(float(oblique_deg)), np.deg2rad(float(oblique_deg)) / 2
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0.0], [np.sin(b), np.cos(b), 0.0], [0.0, 0.0, 1.0]])
    return rz @ rx


def _axis_directions(orientation: str, oblique_deg: float = 0.0) -> np.ndarray:
    """3x3: column a is voxel axis a's unit direction in world coordinates."""
    ornt = _orientation(orientation)
    rot = np.zeros((3, 3))
    for vox_axis, (world_axis, sign) in enumerate(ornt):
        rot[int(world_axis), vox_axis] = sign
    return oblique_rotation(oblique_deg) @ rot if oblique_deg else rot


def _oriented_affine(shape, voxel: float, centre_world: np.ndarray, orientation: str,
                     oblique_deg: float = 0.0) -> np.ndarray:
    rot = _axis_directions(orientation, oblique_deg) * voxel
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre_world - rot @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def brain_anatomy(shape=(24, 28, 20), *, orientation: str = "LAS", scale: float = 1.0,
                  shift_vox=(0.0, 0.0, 0.0), oblique_deg: float = 0.0) -> Anatomy:
    """MNI152 tissue probabilities resampled onto a ``shape`` grid in ``orientation``.

    The isotropic voxel is the smallest that fits the brain's bounding box with a 1 voxel margin
    on every side; ``scale`` (>1 shrinks the brain in the grid) and ``shift_vox`` move the brain
    a little, for subject-to-subject variety."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"phantom shape must be three sizes of at least 4 voxels, got {shape}")
    probs, src_affine = _template_2mm()
    inside = np.argwhere(probs.sum(axis=0) > 0.5)
    lo_w = src_affine[:3, :3] @ inside.min(axis=0) + src_affine[:3, 3]
    hi_w = src_affine[:3, :3] @ inside.max(axis=0) + src_affine[:3, 3]
    extent, centre = np.abs(hi_w - lo_w) + 2.0, (lo_w + hi_w) / 2.0
    # Voxel axes of the target in world axes: the extent each voxel axis must cover.
    if oblique_deg:  # the extent of the brain's box along each tilted voxel axis
        axis_extent = np.abs(_axis_directions(orientation, oblique_deg)).T @ extent
    else:
        ornt = _orientation(orientation)
        axis_extent = np.array([extent[int(w)] for w, _ in ornt])
    voxel = float(np.max(axis_extent / (np.asarray(shape) - 2))) * float(scale)
    affine = _oriented_affine(shape, voxel, centre, orientation, oblique_deg)
    # Target voxel centres (shifted) -> source voxel coordinates.
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1) + np.asarray(shift_vox)[:, None]
    world = affine[:3, :3] @ grid + affine[:3, 3:4]
    src = np.linalg.solve(src_affine[:3, :3], world - src_affine[:3, 3:4])
    # Anti-alias: blur the 2 mm maps by the downsampling factor before linear interpolation.
    sigma = max(voxel / 2.0 - 1.0, 0.0) / 2.0
    out = np.empty((3, *shape), dtype=np.float64)
    for t in range(3):
        src_map = ndimage.gaussian_filter(probs[t], sigma) if sigma > 0 else probs[t]
        out[t] = ndimage.map_coordinates(src_map, src, order=1, mode="constant",
                                         cval=0.0).reshape(shape)
    out = np.clip(out, 0.0, 1.0)
    total = out.sum(axis=0)
    out = np.where(total > 1.0, out / np.maximum(total, 1e-12), out)
    mask = out.sum(axis=0) >= 0.5
    labels = np.zeros(shape, dtype=np.uint8)
    tissue_index = np.argmax(out, axis=0)  # 0 GM, 1 WM, 2 CSF
    labels[mask] = np.array([TISSUE_LABELS["GM"], TISSUE_LABELS["WM"],
                             TISSUE_LABELS["CSF"]])[tissue_index[mask]]
    if not mask.any():
        raise ValueError(f"phantom shape {shape} is too coarse to hold a brain voxel; use at "
                         "least 5 voxels along each axis")
    return Anatomy(affine=affine, probs=out, mask=mask, labels=labels)


# ---- parameter fields ----------------------------------------------------------------------

def smooth_field(shape, rng: np.random.Generator, cycles: float = 2.0) -> np.ndarray:
    """A zero-mean, unit-std random field with about ``cycles`` oscillations across the grid
    (cubic upsampling of a coarse Gaussian lattice)."""
    coarse_shape = tuple(max(2, int(np.ceil(2 * cycles)) + 1) for _ in shape)
    coarse = rng.standard_normal(coarse_shape)
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse_shape)], order=3,
                         mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1], : shape[2]]
    field = field - field.mean()
    return field / max(field.std(), 1e-12)


def bvec_frame(affine: np.ndarray) -> np.ndarray:
    """3x3 matrix taking world (RAS) unit vectors into the frame of an FSL/BIDS ``.bvec`` file
    for an image with ``affine``: the voxel axes, with x flipped when det(affine) > 0."""
    rot = affine[:3, :3] / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    to_voxel = rot.T  # orthonormal columns: the inverse is the transpose
    if np.linalg.det(affine[:3, :3]) > 0:
        to_voxel = np.diag([-1.0, 1.0, 1.0]) @ to_voxel
    return to_voxel


def fibre_directions(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Unit fibre directions (X, Y, Z, 3) in the ``.bvec`` frame, smooth in space: left-right
    near the midline, inferior-superior laterally, and anterior-posterior in a band through the
    middle of each hemisphere (cingulum/longitudinal-like), plus a smooth random perturbation.
    Signs follow a fixed convention (largest component positive) since n and -n are one fibre."""
    shape = anatomy.mask.shape
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = (anatomy.affine[:3, :3] @ grid + anatomy.affine[:3, 3:4]).T
    centre = world[anatomy.mask.reshape(-1)].mean(axis=0)
    half = np.maximum(np.abs(world[anatomy.mask.reshape(-1)] - centre).max(axis=0), 1e-6)
    x, y, z = ((world - centre) / half).T
    w_lr = np.exp(-(x / 0.25) ** 2) * np.exp(-(z / 0.5) ** 2)
    w_ap = np.exp(-((np.abs(x) - 0.45) / 0.15) ** 2) * np.exp(-(z / 0.35) ** 2)
    w_si = 1.0 - np.maximum(w_lr, w_ap)
    vec = w_lr[:, None] * [1.0, 0.0, 0.0] + w_ap[:, None] * [0.0, 1.0, 0.0] \
        + w_si[:, None] * [0.0, 0.0, 1.0]
    vec += 0.35 * np.stack([smooth_field(shape, rng, 1.5).reshape(-1) for _ in range(3)], axis=1)
    vec = vec @ bvec_frame(anatomy.affine).T
    vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    sign = np.sign(vec[np.arange(len(vec)), np.argmax(np.abs(vec), axis=1)])
    return (vec * sign[:, None]).reshape(*shape, 3)


def tissue_parameters(model: str, anatomy: Anatomy, rng: np.random.Generator,
                      b_max: float) -> dict[str, np.ndarray]:
    """Truth maps {label: (X, Y, Z) or (X, Y, Z, 3)} inside the brain (0 outside)."""
    if model not in TISSUE_PARAMETERS:
        raise ValueError(f"the phantom simulates {sorted(TISSUE_PARAMETERS)}, not {model!r}")
    cls = get_model_class(model)
    shape = anatomy.mask.shape
    weights = anatomy.probs / np.maximum(anatomy.probs.sum(axis=0), 1e-12)
    maps = {}
    for spec in cls.parameters:
        if spec.is_direction:
            continue
        value = np.zeros(shape)
        for t, tissue in enumerate(("GM", "WM", "CSF")):
            nominal = TISSUE_PARAMETERS[model][tissue][spec.label]
            field = 1.0 + PARAMETER_VARIATION * smooth_field(shape, rng)
            value += weights[t] * nominal * field
        lo = spec.lo + 0.01 * (spec.hi - spec.lo)
        hi = spec.hi - 0.01 * (spec.hi - spec.lo)
        maps[spec.label] = np.where(anatomy.mask, np.clip(value, lo, hi), 0.0)
    if model == "msdki":
        d = maps["msd"]
        k_edge = MSDKI_MARGIN * 3.0 / (b_max * np.maximum(d, 1e-6)) if b_max > 0 else np.inf
        maps["msk"] = np.where(anatomy.mask, np.minimum(maps["msk"], k_edge), 0.0)
    if model == "ballstick":
        maps["dir"] = np.where(anatomy.mask[..., None], fibre_directions(anatomy, rng), 0.0)
    return maps


def ballstick_cumulants(stickfrac, dpar, diso) -> tuple[np.ndarray, np.ndarray]:
    """(D, K) of the small-b expansion of the direction-averaged ball-stick signal: the stick's
    apparent diffusivity Dpar cos^2 has mean Dpar/3 and second moment Dpar^2/5 over the sphere."""
    f, dpar, diso = (np.asarray(a, dtype=np.float64) for a in (stickfrac, dpar, diso))
    mean = f * dpar / 3.0 + (1 - f) * diso
    second = f * dpar ** 2 / 5.0 + (1 - f) * diso ** 2
    var = second - mean ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(mean > 0, 3.0 * var / mean ** 2, 0.0)
    return mean, k


# ---- the dataset ---------------------------------------------------------------------------

def _as_params(model_obj, maps: dict, mask: np.ndarray) -> np.ndarray:
    cols = []
    for spec in model_obj.parameters:
        m = maps[spec.label][mask]
        cols.append(m if spec.is_direction else m[:, None])
    return np.concatenate(cols, axis=1)


def _to_dtype(signal: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "int16":
        return np.clip(np.rint(signal), 0, _INT16_MAX).astype(np.int16)
    if dtype == "float32":
        return signal.astype(np.float32)
    raise ValueError(f"dtype must be 'int16' or 'float32', got {dtype!r}")


def write_phantom_dataset(bids_dir, truth_dir, *, subjects=("01",), sessions=None, model="msdki",
                          shape=(24, 28, 20), acquisition: Acquisition | None = None,
                          snr: float = 30.0, seed: int = 0, dtype: str = "int16",
                          s0: float = 1000.0, runs=None, acq_label: str | None = None,
                          interleave: bool = True, orientation: str = "LAS",
                          oblique_deg: float = 0.0) -> dict:
    """Write a small valid BIDS raw dataset of synthetic DWI to ``bids_dir`` and its ground
    truth to ``truth_dir`` (which must not be inside ``bids_dir``).

    ``subjects``/``sessions`` are labels (``None``: no session level); ``runs`` an iterable of
    run indices (``None``: no run entity); ``acq_label`` the ``acq-`` entity. ``model`` is the
    signal model that makes the data ("msdki" or "ballstick"). ``acquisition`` defaults to
    :func:`demo_acquisition` (interleaved if ``interleave``); a given one is written in its own
    volume order. ``orientation`` and ``oblique_deg`` set the grid (see the module
    docstring). An existing ``bids_dir`` is added to (its description is kept, participants
    are merged). Every subject has its own anatomy jitter and parameter fields; every series its
    own noise. The same arguments give byte-identical files.

    Returns ``{"bids_dir", "truth_dir", "dataset_description", "participants", "readme",
    "truth_json", "series": [...]}``; each series is ``{"entities", "dwi", "bval", "bvec",
    "json", "truth": {param: path}, "cumulant": {param: path} (ball-stick only), "mask",
    "dseg", "probseg": {tissue: path}, "s0"}``.
    """
    bids_dir, truth_dir = Path(bids_dir).absolute(), Path(truth_dir).absolute()
    if truth_dir == bids_dir or bids_dir in truth_dir.parents:
        raise ValueError(f"truth_dir {truth_dir} must be outside the BIDS folder {bids_dir}")
    if model not in TISSUE_PARAMETERS:
        raise ValueError(f"model must be one of {sorted(TISSUE_PARAMETERS)}, got {model!r}")
    if not float(snr) > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if not float(s0) > 0:
        raise ValueError(f"s0 must be positive, got {s0}")
    if dtype not in ("int16", "float32"):
        raise ValueError(f"dtype must be 'int16' or 'float32', got {dtype!r}")
    subjects = [naming.check_label(s, "subject") for s in
                ([subjects] if isinstance(subjects, str) else subjects)]
    if not subjects:
        raise ValueError("at least one subject label is needed")
    sessions = [None] if sessions is None else [naming.check_label(s, "session") for s in
                                               ([sessions] if isinstance(sessions, str) else sessions)]
    runs = [None] if runs is None else [int(r) for r in runs]
    if acq_label is not None:
        naming.check_label(acq_label, "acquisition")
    acq = acquisition if acquisition is not None else demo_acquisition(interleave=interleave)
    if not acq.b0_mask.any():
        raise ValueError("the phantom's acquisition needs at least one b0 volume")
    b_max = float(acq.bvals.max())
    # A model instance only to reach its numpy forward; the formula takes the phantom's own
    # b-values and directions, so the acquisition need not suit a fit (e.g. one shell for MS-DKI).
    forward_model = make_model(model, hcp_acquisition())

    max_s0 = max(TISSUE_S0.values()) * (1 + 4 * RECEIVE_FIELD_VARIATION)
    if dtype == "int16" and s0 * max_s0 * (1 + 6.0 / snr) > _INT16_MAX:
        raise ValueError(f"s0 = {s0} would overflow int16; lower it or use dtype='float32'")

    brain_anatomy(shape, orientation=orientation, oblique_deg=oblique_deg)  # errors before writes
    bids_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    out = {"bids_dir": bids_dir, "truth_dir": truth_dir, "series": [],
           "dataset_description": write_dataset_description(
               bids_dir, "vaemap synthetic DWI phantom",
               {"GeneratedBy": [{"Name": "vaemap phantom",
                                 "Description": "vaemap_bids.simulate.phantom.write_phantom_dataset"}]})}
    readme = bids_dir / "README"
    if not readme.exists():
        write_text_atomic(readme, (
            "Synthetic diffusion MRI written by vaemap (vaemap_bids.simulate.phantom).\n\n"
            "Brain-like anatomy from the MNI152 2009a tissue maps shipped with nilearn, "
            "tissue-dependent signal-model parameters with smooth spatial variation, and Rician "
            "noise. Nothing here was acquired on a scanner; the ground truth is stored outside "
            "this folder.\n"))
    out["readme"] = readme

    subject_seeds = np.random.SeedSequence(seed).spawn(len(subjects))
    truth_record = {"model": model, "seed": int(seed), "snr": float(snr), "s0": float(s0),
                    "dtype": dtype, "shape": list(map(int, shape)), "orientation": orientation,
                    "oblique_deg": float(oblique_deg),
                    "noise": "Rician, sigma = s0 / snr in both channels (b0 SNR of nominal WM)",
                    "b_max_smm2": b_max * 1e3, "tissue_labels": TISSUE_LABELS,
                    "tissue_parameters": TISSUE_PARAMETERS[model], "tissue_s0": TISSUE_S0,
                    "parameter_variation": PARAMETER_VARIATION,
                    "acquisition": {"n_volumes": acq.n_volumes, "shells": acq.shell_table(),
                                    "interleaved": acquisition is None and bool(interleave)},
                    "units": {p.label: p.units for p in forward_model.parameters},
                    "bvec_frame": "dir maps are in the frame of the .bvec file (FSL convention)",
                    "series": []}
    if model == "ballstick":
        truth_record["cumulant"] = ("MS-DKI maps with desc-cumulant: small-b limit (D = mean "
                                    "apparent diffusivity, K = 3 var / D^2) of the direction-"
                                    "averaged ball-stick signal; not what made the signal")
    participants = []
    for subject, sub_seed in zip(subjects, subject_seeds):
        anat_rng, param_rng, noise_seq = (np.random.default_rng(s) if i < 2 else s
                                          for i, s in enumerate(sub_seed.spawn(3)))
        anatomy = brain_anatomy(shape, orientation=orientation,
                                scale=float(anat_rng.uniform(0.96, 1.04)),
                                shift_vox=anat_rng.uniform(-1.0, 1.0, 3),
                                oblique_deg=oblique_deg)
        maps = tissue_parameters(model, anatomy, param_rng, b_max)
        mask = anatomy.mask
        s0_map = np.zeros(shape)
        weights = anatomy.probs / np.maximum(anatomy.probs.sum(axis=0), 1e-12)
        for t, tissue in enumerate(("GM", "WM", "CSF")):
            s0_map += weights[t] * TISSUE_S0[tissue]
        s0_map = np.where(mask, s0_map * (1 + RECEIVE_FIELD_VARIATION * smooth_field(shape, param_rng, 1.0)),
                          0.0)
        params = _as_params(forward_model, maps, mask)
        if model == "msdki":
            bad = forward_model.invalid_mask(params) | (b_max * params[:, 0] * params[:, 1] >= 3.0)
            if bad.any():  # cannot happen with the clipping above; guards the stored truth
                raise RuntimeError(f"{int(bad.sum())} phantom voxels are outside MS-DKI's domain")
        clean = np.zeros((*shape, acq.n_volumes))
        clean[mask] = float(s0) * s0_map[mask, None] * forward_model.forward_numpy(params, acq.bvals, acq.bvecs)
        participants.append({"participant_id": f"sub-{subject}"})
        series_seeds = noise_seq.spawn(len(sessions) * len(runs))
        for (session, run), s_seed in zip(((s, r) for s in sessions for r in runs), series_seeds):
            entities = {"subject": subject, "session": session, "acquisition": acq_label, "run": run}
            # Noise on S/s0 (nominal WM b0 = 1) with sigma = 1/snr, scaled back to s0.
            noisy = add_rician_noise(clean / float(s0), snr, np.random.default_rng(s_seed)) * float(s0)
            data = _to_dtype(noisy, dtype)
            dwi = (bids_dir / naming.subject_dir(entities) / "dwi"
                   / f"{naming.prefix(entities)}_dwi.nii.gz")
            sidecar = {**SEQUENCE,
                       "SeriesDescription": f"vaemap phantom ({model}, SNR {snr:g})",
                       "ScanningSequence": "EP", "SequenceVariant": "SK", "MRAcquisitionType": "2D"}
            paths = write_dwi_series(dwi, data, anatomy.affine, acq.bvals * 1e3, acq.bvecs, sidecar,
                                     tr=SEQUENCE["RepetitionTime"])
            series = {"entities": {k: v for k, v in entities.items() if v is not None}, **paths}
            series.update(_write_truth(truth_dir, entities, model, forward_model, maps, anatomy,
                                       s0_map * s0))
            out["series"].append(series)
            truth_record["series"].append({
                "entities": series["entities"],
                "dwi": str(Path(paths["dwi"]).relative_to(bids_dir)),
                "truth": {k: Path(v).name for k, v in series["truth"].items()},
                "mask": Path(series["mask"]).name, "dseg": Path(series["dseg"]).name,
                "n_brain_voxels": int(mask.sum()),
                "tissue_voxels": {t: int((anatomy.labels == v).sum()) for t, v in TISSUE_LABELS.items()},
                "voxel_size_mm": float(np.sqrt((anatomy.affine[:3, 0] ** 2).sum())),
            })
    out["participants"] = update_participants(bids_dir, participants)
    out["truth_json"] = write_json_atomic(truth_dir / "truth.json", truth_record)
    return out


def _write_truth(truth_dir: Path, entities: dict, model: str, forward_model, maps: dict,
                 anatomy: Anatomy, s0_map: np.ndarray) -> dict:
    folder = truth_dir / naming.subject_dir(entities) / "dwi"
    pre = naming.prefix(entities)

    def truth_name(model_name, method, param):
        return output("param", entities, model=model_name, method=method, param=param).name

    def nifti(data, name, dtype=np.float32):
        img = nib.Nifti1Image(np.asarray(data).astype(dtype), anatomy.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(anatomy.affine, code=1)
        img.set_sform(anatomy.affine, code=1)
        return write_nifti_atomic(folder / name, img)

    out = {"truth": {}}
    for spec in forward_model.parameters:
        out["truth"][spec.label] = nifti(maps[spec.label],
                                         truth_name(model, "truth", spec.label))
    if model == "ballstick":
        d, k = ballstick_cumulants(maps["stickfrac"], maps["dpar"], maps["diso"])
        out["cumulant"] = {"msd": nifti(np.where(anatomy.mask, d, 0),
                                        truth_name("msdki", "cumulant", "msd")),
                           "msk": nifti(np.where(anatomy.mask, k, 0),
                                        truth_name("msdki", "cumulant", "msk"))}
    out["mask"] = nifti(anatomy.mask, output("mask", entities).name, np.uint8)
    out["dseg"] = nifti(anatomy.labels, f"{pre}_desc-tissue_dseg.nii.gz", np.uint8)
    out["probseg"] = {t: nifti(anatomy.probs[i] * anatomy.mask, f"{pre}_label-{t}_probseg.nii.gz")
                      for i, t in enumerate(("GM", "WM", "CSF"))}
    out["s0"] = nifti(s0_map, f"{pre}_desc-truth_S0map.nii.gz")
    return out
