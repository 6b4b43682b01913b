"""Ball and stick (Behrens et al. 2003).

S/S0 = f exp(-b Dpar (g.n)^2) + (1 - f) exp(-b Diso). The direction n is a free 3-vector
normalised in the forward pass, so there is no angle wrap-around and n, -n give the same signal.
"""
from __future__ import annotations

import numpy as np
import torch

from .acquisition import Acquisition, _count_directions
from .base import ParameterSpec, SignalModel, register

MIN_DIRECTIONS = 6


@register
class BallStick(SignalModel):
    name = "ballstick"
    long_name = "Ball and stick"
    description = ("Two compartments: a stick of parallel diffusivity Dpar along n with volume "
                   "fraction f, and an isotropic ball of diffusivity Diso: "
                   "S/S0 = f exp(-b Dpar (g.n)^2) + (1 - f) exp(-b Diso).")
    url = "https://doi.org/10.1002/mrm.10609"
    citation = ("Behrens TEJ, Woolrich MW, Jenkinson M, et al. Characterization and propagation "
                "of uncertainty in diffusion-weighted MR imaging. Magn Reson Med 2003;50:1077-1088.")
    parameters = (
        ParameterSpec("stickfrac", 0.0, 1.0, "arbitrary", "Volume fraction of the stick compartment"),
        ParameterSpec("dpar", 0.0, 3.5, "um^2/ms", "Parallel diffusivity of the stick"),
        ParameterSpec("diso", 0.0, 3.5, "um^2/ms", "Diffusivity of the isotropic ball"),
        ParameterSpec("dir", -1.0, 1.0, "arbitrary",
                      "Unit direction of the stick, in the frame of the gradient directions "
                      "(n and -n are the same fibre)", size=3),
    )

    @classmethod
    def check_acquisition(cls, acq: Acquisition) -> None:
        weighted = ~acq.b0_mask
        if not weighted.any():
            raise ValueError("ball-stick needs diffusion-weighted volumes; this acquisition has none")
        n_dirs = _count_directions(acq.bvecs[weighted])
        if n_dirs < MIN_DIRECTIONS:
            raise ValueError(f"ball-stick needs at least {MIN_DIRECTIONS} distinct gradient "
                             f"directions; this acquisition has {n_dirs}")
        if not acq.b0_mask.any():
            raise ValueError("ball-stick needs at least one b0 volume")

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        b, g = self.tensors(params.device, params.dtype)
        f = params[:, 0:1]
        dpar = params[:, 1:2]
        diso = params[:, 2:3]
        n = params[:, 3:6]
        n = n / n.norm(dim=1, keepdim=True).clamp_min(1e-8)
        cos2 = (n @ g.T) ** 2
        return f * torch.exp(-b[None, :] * dpar * cos2) + (1 - f) * torch.exp(-b[None, :] * diso)

    def forward_numpy(self, params, bvals=None, bvecs=None) -> np.ndarray:
        params = np.atleast_2d(np.asarray(params, dtype=np.float64))
        b = self.acquisition.bvals if bvals is None else np.asarray(bvals, dtype=np.float64)
        g = self.acquisition.bvecs if bvecs is None else np.asarray(bvecs, dtype=np.float64)
        f, dpar, diso = params[:, 0:1], params[:, 1:2], params[:, 2:3]
        n = params[:, 3:6] / np.maximum(np.linalg.norm(params[:, 3:6], axis=1, keepdims=True), 1e-12)
        cos2 = (n @ g.T) ** 2
        return f * np.exp(-b[None, :] * dpar * cos2) + (1 - f) * np.exp(-b[None, :] * diso)
