"""Reference acquisitions that ship with the package."""
from __future__ import annotations

from importlib.resources import files

import numpy as np

from ..physics.acquisition import Acquisition

_HCP = files("vaemap_bids") / "data" / "hcp_wu_minn"


def hcp_acquisition() -> Acquisition:
    """HCP WU-Minn 1200: 18 b0 and 90 directions at each of b = 1000, 2000, 3000 s/mm^2."""
    bvals = np.loadtxt(str(_HCP / "bvals_hcp_wu_minn.txt"))
    bvecs = np.loadtxt(str(_HCP / "bvecs_hcp_wu_minn.txt"))
    return Acquisition.from_smm2(bvals, bvecs)
