"""Diffusion acquisition: b-values, gradient directions and shells.

Internal units are ms/um^2 for b (BIDS ``.bval`` files are s/mm^2: multiply by 1e-3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: b-values below this (ms/um^2) count as b0 (50 s/mm^2 covers scanners that write b=5 or b=40).
B0_THRESHOLD = 0.05
#: b-values within this distance (ms/um^2) of each other belong to one shell.
SHELL_TOLERANCE = 0.1


@dataclass(frozen=True)
class Acquisition:
    """The b-values (ms/um^2) and unit gradient directions of T volumes."""

    bvals: np.ndarray
    bvecs: np.ndarray
    b0_threshold: float = B0_THRESHOLD
    shell_tolerance: float = SHELL_TOLERANCE
    _shell_index: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        bvals = np.asarray(self.bvals, dtype=np.float64).reshape(-1)
        bvecs = np.asarray(self.bvecs, dtype=np.float64)
        if bvecs.ndim != 2 or 3 not in bvecs.shape:
            raise ValueError(f"bvecs must have shape (T, 3) or (3, T), got {bvecs.shape}")
        if bvecs.shape[1] != 3:
            bvecs = bvecs.T
        if bvecs.shape[0] != bvals.size:
            raise ValueError(
                f"{bvals.size} b-values but {bvecs.shape[0]} gradient directions")
        if not np.all(np.isfinite(bvals)) or not np.all(np.isfinite(bvecs)):
            raise ValueError("b-values and gradient directions must be finite")
        if np.any(bvals < 0):
            raise ValueError("b-values must be non-negative")
        norms = np.linalg.norm(bvecs, axis=1)
        weighted = bvals >= self.b0_threshold
        if np.any(weighted & (norms < 1e-6)):
            raise ValueError("a diffusion-weighted volume has a zero gradient direction")
        if np.any(weighted & (np.abs(norms - 1.0) > 0.1)):
            raise ValueError("gradient directions of diffusion-weighted volumes must be unit vectors")
        unit = np.where(norms[:, None] > 1e-6, bvecs / np.maximum(norms, 1e-12)[:, None], 0.0)
        object.__setattr__(self, "bvals", bvals)
        object.__setattr__(self, "bvecs", unit)
        object.__setattr__(self, "_shell_index", _group_shells(bvals, self.b0_threshold,
                                                               self.shell_tolerance))

    @classmethod
    def from_smm2(cls, bvals_smm2, bvecs, **kwargs) -> "Acquisition":
        """Build from b-values in s/mm^2 (the unit of BIDS and FSL files)."""
        return cls(np.asarray(bvals_smm2, dtype=np.float64) * 1e-3, bvecs, **kwargs)

    @property
    def n_volumes(self) -> int:
        return int(self.bvals.size)

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals < self.b0_threshold

    @property
    def shell_index(self) -> np.ndarray:
        """Per volume, the index of its shell (0 is the b0 shell when there is one)."""
        return self._shell_index

    @property
    def shell_bvals(self) -> np.ndarray:
        """Mean b-value of each shell, ascending (b0 shell first when present)."""
        return np.array([self.bvals[self._shell_index == s].mean()
                         for s in range(self._shell_index.max() + 1)])

    @property
    def nonzero_shells(self) -> np.ndarray:
        sb = self.shell_bvals
        return sb[sb >= self.b0_threshold]

    def shell_table(self) -> list[dict]:
        """One row per shell: nominal b (s/mm^2), number of volumes, number of distinct directions."""
        rows = []
        for s, b in enumerate(self.shell_bvals):
            sel = self._shell_index == s
            dirs = self.bvecs[sel]
            n_dirs = 0 if b < self.b0_threshold else _count_directions(dirs)
            rows.append({"bval_smm2": float(round(b * 1e3)), "n_volumes": int(sel.sum()),
                         "n_directions": int(n_dirs)})
        return rows

    def subset(self, volumes: np.ndarray) -> "Acquisition":
        """The acquisition restricted to some volumes (a boolean mask or indices)."""
        return Acquisition(self.bvals[volumes], self.bvecs[volumes], self.b0_threshold,
                           self.shell_tolerance)


def _group_shells(bvals: np.ndarray, b0_threshold: float, tolerance: float) -> np.ndarray:
    """Cluster b-values into shells: sorted values split wherever the gap exceeds the tolerance."""
    order = np.argsort(bvals, kind="stable")
    index = np.empty(bvals.size, dtype=np.int64)
    shell = 0
    prev = None
    for i in order:
        b = bvals[i]
        if prev is not None:
            crosses_b0 = (prev < b0_threshold) != (b < b0_threshold)
            if crosses_b0 or b - prev > tolerance:
                shell += 1
        index[i] = shell
        prev = b
    return index


def _count_directions(dirs: np.ndarray, tol_deg: float = 1.0) -> int:
    """Distinct directions, antipodal pairs counted once."""
    kept: list[np.ndarray] = []
    cos_tol = np.cos(np.deg2rad(tol_deg))
    for d in dirs:
        if not any(abs(float(d @ k)) > cos_tol for k in kept):
            kept.append(d)
    return len(kept)


def normalise_by_b0(signals: np.ndarray, acq: Acquisition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Divide each voxel's signal by its mean b0.

    Returns ``(normalised, s0, valid)``; ``valid`` is False where the voxel has a non-finite
    value or a mean b0 that is not positive. Invalid voxels are zero in ``normalised`` so that
    they never propagate NaN into a fit; callers report and exclude them.
    """
    signals = np.asarray(signals)
    if signals.ndim != 2:
        raise ValueError(f"signals must be 2-D (voxels, volumes), got shape {signals.shape}")
    if signals.shape[1] != acq.n_volumes:
        raise ValueError(
            f"signals have {signals.shape[1]} volumes but the acquisition has {acq.n_volumes}")
    if not acq.b0_mask.any():
        raise ValueError("the acquisition has no b0 volume (b < 50 s/mm^2) to normalise by")
    finite = np.all(np.isfinite(signals), axis=1)
    safe = np.where(finite[:, None], signals, 0.0).astype(np.float64)
    s0 = safe[:, acq.b0_mask].mean(axis=1)
    valid = finite & (s0 > 0)
    out = np.zeros(signals.shape, dtype=np.float32)
    out[valid] = (safe[valid] / s0[valid, None]).astype(np.float32)
    return out, s0.astype(np.float32), valid
