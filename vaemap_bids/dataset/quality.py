"""Volumes that must not be fitted: dead (no signal in the brain) or far from their shell.

One dead volume biases a whole map (an all-zero b0 shifts MS-DKI's D by about a quarter; an
all-zero weighted volume doubles the stick's Dpar), so the planning pass looks at every volume's
typical brain signal, from the low-resolution copies it keeps (:class:`.image.ImageScan`), and
the graph never sees the volumes found here.
"""
from __future__ import annotations

import numpy as np

from ..physics import Acquisition

#: A volume whose typical brain signal differs from its shell's median by more than this factor
#: (or by more than OUTLIER_MADS robust standard deviations of the shell, whichever is larger).
OUTLIER_FACTOR = 2.0
OUTLIER_MADS = 8.0
#: Fewer volumes than this in a shell: only dead volumes are detected there.
MIN_SHELL_VOLUMES = 3


def _block_mask(mask: np.ndarray, block: int, shape: tuple[int, ...]) -> np.ndarray:
    """Blocks (the thumbnails' grid) that lie mostly inside the brain mask."""
    if block == 1:
        return mask
    padded = np.zeros(tuple(-(-s // block) * block for s in mask.shape), dtype=np.float32)
    padded[tuple(slice(0, s) for s in mask.shape)] = mask
    x, y, z = (s // block for s in padded.shape)
    frac = padded.reshape(x, block, y, block, z, block).mean(axis=(1, 3, 5))
    inside = frac >= 0.5
    return inside if inside.any() else frac > 0


def find_bad_volumes(thumbnails: np.ndarray, block: int, mask: np.ndarray,
                     acq: Acquisition) -> dict[int, str]:
    """``{volume index: why}`` for dead volumes (no signal in the brain) and volumes whose
    median brain signal is a factor OUTLIER_FACTOR (or OUTLIER_MADS robust SDs) away from their
    shell's median. ``thumbnails`` (T, x, y, z) are block means of each volume."""
    inside = _block_mask(np.asarray(mask, dtype=bool), block, thumbnails.shape[1:])
    values = thumbnails[:, inside]                                   # (T, n blocks)
    typical = np.median(values, axis=1)
    alive = np.mean(values > 0, axis=1)
    bad: dict[int, str] = {}
    for i in np.flatnonzero((typical <= 0) | (alive < 0.05)):
        bad[int(i)] = "no signal in the brain (a dead volume)"
    for shell in np.unique(acq.shell_index):
        members = np.flatnonzero((acq.shell_index == shell) & (typical > 0))
        members = np.array([i for i in members if int(i) not in bad], dtype=int)
        if members.size < MIN_SHELL_VOLUMES:
            continue
        logs = np.log(typical[members])
        centre = np.median(logs)
        spread = 1.4826 * np.median(np.abs(logs - centre))
        limit = max(OUTLIER_MADS * spread, np.log(OUTLIER_FACTOR))
        b = acq.shell_bvals[shell] * 1e3
        for i, value in zip(members, logs):
            if abs(value - centre) > limit:
                ratio = float(np.exp(value - centre))
                bad[int(i)] = (f"its brain signal is {ratio:.2g} times its shell's "
                               f"(b = {b:.0f} s/mm^2) median")
    return dict(sorted(bad.items()))
