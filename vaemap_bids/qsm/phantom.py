"""vaemap's own QSM phantom: an anatomy-like susceptibility distribution, its background and
local fields, and multi-echo gradient-echo magnitude and wrapped phase with complex noise,
optionally written as a BIDS MEGRE dataset.

Geometry (normalised head coordinates, x = left-right, y = posterior-anterior, z =
inferior-superior): a head ellipsoid of soft tissue inside air, a skull shell, a brain with
cortical grey matter, white matter, two lateral ventricles, deep-grey-matter nuclei (caudate,
putamen, globus pallidus, thalamus, substantia nigra, red nucleus; both sides), veins (the
superior sagittal sinus, the straight sinus, cortical veins), a calcification, and air cavities
(a frontal/nasal sinus, two ear canals) whose air/tissue boundaries make the background field.

Susceptibilities are relative to air (0 in air and in the zero padding, which stands for the air
around the head): soft tissue is -9.4 ppm, and brain tissues add their literature-range
contrast (ppm, relative to water-like tissue). The local-field truth is the field of the brain's
contrast alone (``chi_local``, the brain's chi relative to soft tissue, 0 outside the brain):
the QSM Challenge definition. The phase of echo n is ``phi0 + gamma B0 TE_n field_total``, with
a smooth receiver phase phi0; the magnitude has T2* decay and the signal loss of intravoxel
dephasing (the field's gradient across a voxel); complex Gaussian noise of standard deviation ``1 / snr`` (relative
to a proton density of 1) is added to the complex signal. ``oblique_deg`` tilts the head about
the left-right and anterior-posterior axes through the affine (the voxel grid, and so chi on it,
is the same as for an axial acquisition: only B0's direction in the voxel axes changes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .dipole import GAMMA, forward_field

AIR_TISSUE = -9.4   # ppm: soft tissue relative to air

#: (name, centre (x, y, z), semi-axes, chi ppm, M0, R2* 1/s); both sides when x != 0
NUCLEI = (
    ("caudate", (0.14, 0.16, 0.14), (0.05, 0.09, 0.07), 0.06, 0.80, 22.0),
    ("putamen", (0.25, 0.05, 0.05), (0.05, 0.11, 0.08), 0.05, 0.78, 25.0),
    ("pallidus", (0.18, 0.02, 0.02), (0.03, 0.06, 0.05), 0.16, 0.70, 45.0),
    ("thalamus", (0.09, -0.10, 0.08), (0.07, 0.09, 0.07), 0.02, 0.76, 20.0),
    ("nigra", (0.07, -0.08, -0.18), (0.025, 0.05, 0.03), 0.12, 0.72, 40.0),
    ("rednucleus", (0.045, -0.10, -0.13), (0.025, 0.025, 0.025), 0.10, 0.72, 35.0),
)
CALCIFICATION = ("calcification", (-0.30, 0.30, 0.30), 0.035, -0.30, 0.25, 80.0)


@dataclass
class QsmPhantom:
    """What :func:`make_qsm_phantom` returns (arrays on the voxel grid, ppm where a field)."""

    affine: np.ndarray
    echo_times_s: tuple
    b0_tesla: float
    magnitude: np.ndarray        # x, y, z, echo
    phase: np.ndarray            # x, y, z, echo; radians in [-pi, pi)
    chi: np.ndarray              # everything, relative to air (ppm)
    chi_local: np.ndarray        # the brain's contrast, 0 outside the brain (ppm)
    brain_mask: np.ndarray
    local_field: np.ndarray      # field of chi_local (ppm)
    background_field: np.ndarray  # field of the rest (ppm)
    labels: dict = field(default_factory=dict)   # region name -> boolean mask

    @property
    def total_field(self) -> np.ndarray:
        return self.local_field + self.background_field

    @property
    def zooms(self):
        return tuple(np.linalg.norm(self.affine[:3, :3], axis=0))


def _ellipsoid(u, centre, axes):
    return sum(((u[i] - centre[i]) / axes[i]) ** 2 for i in range(3)) <= 1.0


def _tube(u, points, radius):
    """Voxels within ``radius`` (normalised units) of the polyline through ``points``."""
    out = np.zeros(u[0].shape, bool)
    pts = np.asarray(points, float)
    for a, b in zip(pts[:-1], pts[1:]):
        ab = b - a
        t = sum((u[i] - a[i]) * ab[i] for i in range(3)) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        d2 = sum((u[i] - (a[i] + t * ab[i])) ** 2 for i in range(3))
        out |= d2 <= radius ** 2
    return out


def oblique_affine(shape, voxel_mm, oblique_deg: float = 0.0) -> np.ndarray:
    """A RAS+ affine of ``shape`` and ``voxel_mm``, rotated by ``oblique_deg`` about x then y."""
    a = np.deg2rad(oblique_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    b = np.deg2rad(0.6 * oblique_deg)
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    r = ry @ rx @ np.diag(np.broadcast_to(np.asarray(voxel_mm, float), (3,)))
    aff = np.eye(4)
    aff[:3, :3] = r
    aff[:3, 3] = -r @ (np.asarray(shape[:3], float) - 1) / 2.0
    return aff


def make_qsm_phantom(shape=(64, 72, 56), voxel_mm=2.4, echo_times_s=(0.004, 0.008, 0.012,
                     0.016, 0.020), b0_tesla: float = 3.0, snr: float = 100.0, seed: int = 0,
                     oblique_deg: float = 0.0, texture_ppm: float = 0.01) -> QsmPhantom:
    """The phantom on a grid of ``shape`` (voxels) and ``voxel_mm``; see the module docstring."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    u = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = _ellipsoid(u, (0, 0, -0.02), (0.80, 0.90, 0.86))
    skull_out = _ellipsoid(u, (0, 0.0, 0.06), (0.72, 0.82, 0.76))
    brain = _ellipsoid(u, (0, 0.0, 0.08), (0.66, 0.76, 0.68))
    sinus = _ellipsoid(u, (0, 0.62, -0.42), (0.16, 0.14, 0.16))
    ears = _ellipsoid(u, (0.62, -0.05, -0.45), (0.10, 0.08, 0.08)) | \
        _ellipsoid(u, (-0.62, -0.05, -0.45), (0.10, 0.08, 0.08))
    air_in_head = (sinus | ears) & head
    # the cavities sit in bone: a wall around them keeps the brain off the air
    wall = _ellipsoid(u, (0, 0.62, -0.42), (0.30, 0.28, 0.28)) | \
        _ellipsoid(u, (0.62, -0.05, -0.45), (0.22, 0.18, 0.18)) | \
        _ellipsoid(u, (-0.62, -0.05, -0.45), (0.22, 0.18, 0.18))
    brain &= ~wall
    cortex = brain & ~_ellipsoid(u, (0, 0.0, 0.08), (0.58, 0.68, 0.60))
    vent = (_ellipsoid(u, (0.08, 0.05, 0.18), (0.05, 0.22, 0.07)) |
            _ellipsoid(u, (-0.08, 0.05, 0.18), (0.05, 0.22, 0.07))) & brain

    contrast = np.zeros(shape)        # relative to soft tissue, ppm
    m0 = np.zeros(shape)
    r2s = np.zeros(shape)
    tissue = head & ~air_in_head
    m0[tissue], r2s[tissue] = 0.55, 30.0                       # scalp, muscle
    skull = tissue & ((skull_out & ~brain) | (wall & ~air_in_head))
    skull &= ~_ellipsoid(u, (0, 0.0, 0.07), (0.67, 0.77, 0.69))
    contrast[skull], m0[skull], r2s[skull] = -2.0, 0.08, 300.0  # cortical bone
    wm = brain & ~cortex
    contrast[wm], m0[wm], r2s[wm] = -0.03, 0.70, 20.0
    contrast[cortex], m0[cortex], r2s[cortex] = 0.02, 0.85, 15.0
    contrast[vent], m0[vent], r2s[vent] = 0.0, 1.0, 3.0
    labels = {"brain": brain, "wm": wm, "cortex": cortex, "ventricles": vent}
    # smooth tissue texture (not in CSF)
    tex = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    tex *= texture_ppm / (tex[brain].std() or 1.0)
    contrast[brain & ~vent] += tex[brain & ~vent]
    for name, c, ax, chi, mz, r2 in NUCLEI:
        for side, sx in (("L", -1), ("R", 1)):
            region = _ellipsoid(u, (sx * c[0], c[1], c[2]), ax) & brain
            contrast[region], m0[region], r2s[region] = chi, mz, r2
            labels[f"{name}{side}"] = region
    veins = (_tube(u, [(0, 0.65, 0.50), (0, 0.35, 0.70), (0, -0.10, 0.74), (0, -0.50, 0.58),
                       (0, -0.70, 0.25)], 0.035) |
             _tube(u, [(0, -0.15, 0.25), (0, -0.45, 0.30), (0, -0.66, 0.24)], 0.025) |
             _tube(u, [(0.30, 0.30, 0.55), (0.45, 0.05, 0.50), (0.52, -0.25, 0.35)], 0.02) |
             _tube(u, [(-0.35, 0.15, 0.58), (-0.50, -0.10, 0.40), (-0.55, -0.35, 0.15)], 0.02))
    veins &= brain
    contrast[veins], m0[veins], r2s[veins] = 0.40, 0.45, 50.0
    labels["veins"] = veins
    name, c, radius, chi, mz, r2 = CALCIFICATION
    calc = _ellipsoid(u, c, (radius,) * 3) & brain
    contrast[calc], m0[calc], r2s[calc] = chi, mz, r2
    labels[name] = calc

    chi_total = np.where(tissue, AIR_TISSUE + contrast, 0.0)
    chi_local = np.where(brain, contrast, 0.0)
    affine = oblique_affine(shape, voxel_mm, oblique_deg)
    # a generous padding for the total field: the air around the head is the padding
    total = forward_field(chi_total, affine, pad=1.0)
    local = forward_field(chi_local, affine, pad=1.0)
    background = total - local

    te = np.asarray(echo_times_s, float)
    phi0 = 0.4 * np.pi * (0.5 * u[0] + 0.3 * u[1] ** 2 - 0.2 * u[2])   # receiver phase
    omega = GAMMA * b0_tesla * total * 1e-6
    # intravoxel dephasing: a linear field across a voxel scales its signal by
    # prod_i sinc(grad_i omega TE / 2 pi) (numpy's sinc(x) = sin(pi x) / (pi x))
    grads = np.gradient(omega)
    dephase = np.ones(shape + (te.size,))
    for g in grads:
        dephase *= np.abs(np.sinc(g[..., None] * te / (2 * np.pi)))
    sig = m0[..., None] * np.exp(-te * r2s[..., None]) * dephase * \
        np.exp(1j * (phi0[..., None] + omega[..., None] * te))
    noise = (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape)) / snr
    sig = sig + noise
    return QsmPhantom(affine, tuple(float(t) for t in te), float(b0_tesla),
                      np.abs(sig).astype(np.float32), np.angle(sig).astype(np.float32),
                      chi_total, chi_local, brain, local, background, labels)


def phase_to_integer(phase_rad: np.ndarray, low: int = -4096, high: int = 4095) -> np.ndarray:
    """Scanner integer phase (Siemens-like, ``low..high``) from radians in [-pi, pi)."""
    span = high - low + 1
    return np.clip(np.round((phase_rad + np.pi) / (2 * np.pi) * span) + low, low, high)


def write_megre_dataset(root, phantom: QsmPhantom, subject: str = "01",
                        session: str | None = None, integer_phase: bool = False,
                        with_truth: bool = True) -> Path:
    """Write ``phantom`` as a BIDS dataset: ``sub-<L>[/ses-<S>]/anat/
    sub-<L>[_ses-<S>]_echo-<N>_part-{mag,phase}_MEGRE.nii.gz`` with sidecars (EchoTime in s,
    MagneticFieldStrength in T). The truth (chi, local field, brain mask) goes to
    ``root/derivatives/truth`` (ignored by BIDS tools) when ``with_truth``. Returns ``root``."""
    import nibabel as nib
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    desc = root / "dataset_description.json"
    if not desc.exists():
        desc.write_text(json.dumps({"Name": "vaemap QSM phantom", "BIDSVersion": "1.9.0",
                                    "DatasetType": "raw"}, indent=2))
    sub = f"sub-{subject}"
    folder = root / sub / (f"ses-{session}" if session else "") / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    stem = sub + (f"_ses-{session}" if session else "")
    for n, te in enumerate(phantom.echo_times_s, start=1):
        for part in ("mag", "phase"):
            data = phantom.magnitude[..., n - 1] if part == "mag" else phantom.phase[..., n - 1]
            if part == "phase" and integer_phase:
                data = phase_to_integer(data).astype(np.int16)
            img = nib.Nifti1Image(np.asarray(data), phantom.affine)
            img.set_qform(phantom.affine, code=1)
            img.set_sform(phantom.affine, code=1)
            name = f"{stem}_echo-{n}_part-{part}_MEGRE"
            nib.save(img, folder / f"{name}.nii.gz")
            meta = {"EchoTime": te, "MagneticFieldStrength": phantom.b0_tesla,
                    "EchoNumber": n}
            (folder / f"{name}.json").write_text(json.dumps(meta, indent=2))
    if with_truth:
        truth = root / "derivatives" / "truth" / sub / "anat"
        truth.mkdir(parents=True, exist_ok=True)
        for arr, name in ((phantom.chi_local, "Chimap"), (phantom.local_field, "localfield"),
                          (phantom.brain_mask.astype(np.uint8), "mask")):
            nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32 if arr.dtype != np.uint8
                                                else np.uint8), phantom.affine),
                     truth / f"{stem}_desc-truth_{name}.nii.gz")
        bidsignore = root / ".bidsignore"
        if not bidsignore.exists():
            bidsignore.write_text("derivatives/\n")
    return root


__all__ = ["QsmPhantom", "NUCLEI", "make_qsm_phantom", "oblique_affine", "phase_to_integer",
           "write_megre_dataset"]
