"""Mean-signal diffusion kurtosis imaging (Henriques et al. 2019).

S(b)/S0 = exp(-b D + b^2 D^2 K / 6), the direction-averaged signal of each shell. The model is
physical only while the signal decreases with b, i.e. b < 3 / (D K), at every b-value used; the
squashing therefore bounds K by min(K_hi, 3 / (b_max D)) so that no fit can leave that domain.
"""
from __future__ import annotations

import numpy as np
import torch

from .acquisition import Acquisition
from .base import ParameterSpec, SignalModel, register

#: MS-DKI uses shells up to this b (ms/um^2); higher shells break the cumulant expansion.
MSDKI_MAX_B = 2.5
#: Fraction of the validity edge b_max D K = 3 that K may reach, so that a saturated sigmoid
#: (exactly 1.0 in float arithmetic) still gives a strictly decreasing signal.
VALIDITY_MARGIN = 0.999


@register
class MeanSignalDKI(SignalModel):
    name = "msdki"
    long_name = "Mean signal diffusion kurtosis imaging"
    description = ("Direction-averaged signal of each shell, S(b)/S0 = exp(-b D + b^2 D^2 K / 6), "
                   f"fitted to the shells with b <= {MSDKI_MAX_B * 1e3:.0f} s/mm^2.")
    url = "https://doi.org/10.1002/mrm.27723"
    citation = ("Henriques RN, Correia MM, Marrale M, et al. Diffusional kurtosis imaging in the "
                "diffusion imaging in Python project. Front Hum Neurosci 2021; and Henriques RN, "
                "Jespersen SN, Shemesh N. Microscopic anisotropy misestimation in spherical-mean "
                "single diffusion encoding MRI. Magn Reson Med 2019;81:3245-3261.")
    parameters = (
        ParameterSpec("msd", 0.0, 3.5, "um^2/ms", "Mean signal diffusivity"),
        ParameterSpec("msk", 0.0, 3.0, "arbitrary", "Mean signal kurtosis"),
    )

    def __init__(self, acquisition: Acquisition, max_b: float = MSDKI_MAX_B):
        self.max_b = float(max_b)
        self._check(acquisition, self.max_b)
        super().__init__(acquisition)
        self.b_max_used = float(self.acquisition.bvals.max())

    @classmethod
    def check_acquisition(cls, acq: Acquisition) -> None:
        cls._check(acq, MSDKI_MAX_B)

    @staticmethod
    def _check(acq: Acquisition, max_b: float) -> None:
        shells = acq.nonzero_shells
        usable = shells[shells <= max_b + acq.shell_tolerance]
        if usable.size < 2:
            raise ValueError(
                f"MS-DKI needs at least two non-zero shells with b <= {max_b * 1e3:.0f} s/mm^2; "
                f"this acquisition has {usable.size} "
                f"(shells: {', '.join(f'{b * 1e3:.0f}' for b in shells) or 'none'} s/mm^2)")
        if not acq.b0_mask.any():
            raise ValueError("MS-DKI needs at least one b0 volume")

    def select_volumes(self, acq: Acquisition) -> np.ndarray:
        return acq.bvals <= self.max_b + acq.shell_tolerance

    def k_max(self, d):
        """Largest kurtosis that keeps the signal decreasing up to the largest b used."""
        lib = torch if isinstance(d, torch.Tensor) else np
        k_hi = self.parameters[1].hi
        edge = 3.0 * VALIDITY_MARGIN / (self.b_max_used * lib.clip(d, 1e-6, None))
        return lib.minimum(lib.full_like(d, k_hi), edge)

    def squash(self, raw: torch.Tensor) -> torch.Tensor:
        p_d = self.parameters[0]
        d = p_d.lo + (p_d.hi - p_d.lo) * torch.sigmoid(raw[:, 0])
        k = self.k_max(d) * torch.sigmoid(raw[:, 1])
        return torch.stack([d, k], dim=1)

    def unsquash(self, params: np.ndarray) -> np.ndarray:
        params = np.asarray(params, dtype=np.float64)
        p_d = self.parameters[0]
        fd = np.clip((params[:, 0] - p_d.lo) / (p_d.hi - p_d.lo), 1e-6, 1 - 1e-6)
        d = p_d.lo + (p_d.hi - p_d.lo) * fd
        fk = np.clip(params[:, 1] / self.k_max(d), 1e-6, 1 - 1e-6)
        return np.stack([np.log(fd) - np.log1p(-fd), np.log(fk) - np.log1p(-fk)], axis=1)

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        # The signal depends on b alone. Without a backward pass (inference, the forward-mode
        # Jacobians of the refinement) each distinct b-value is evaluated once and copied to its
        # volumes: exact, and several times less work. With one, the copy's backward (a scatter-
        # add) costs more than it saves (measured), so every volume is evaluated.
        if params.requires_grad and torch.is_grad_enabled():
            b, where = self.tensors(params.device, params.dtype)[0], None
        else:
            b, where = self._distinct_b(params.device, params.dtype)
        d = params[:, 0:1]
        k = params[:, 1:2]
        bd = b[None, :] * d
        signal = torch.exp(-bd + bd * bd * k / 6.0)
        return signal if where is None else signal[:, where]

    def _distinct_b(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("distinct-b", str(device), dtype)
        if key not in self._device_cache:
            values, where = np.unique(self.acquisition.bvals, return_inverse=True)
            self._device_cache[key] = (torch.as_tensor(values, dtype=dtype, device=device),
                                       torch.as_tensor(where.ravel(), device=device))
        return self._device_cache[key]

    def forward_numpy(self, params, bvals=None, bvecs=None) -> np.ndarray:
        params = np.atleast_2d(np.asarray(params, dtype=np.float64))
        b = self.acquisition.bvals if bvals is None else np.asarray(bvals, dtype=np.float64)
        bd = b[None, :] * params[:, 0:1]
        return np.exp(-bd + bd * bd * params[:, 1:2] / 6.0)

    def invalid_mask(self, params: np.ndarray) -> np.ndarray:
        params = np.asarray(params)
        d, k = params[:, 0], params[:, 1]
        return ~np.isfinite(d) | ~np.isfinite(k) | (d <= 0) | (k < 0) | (self.b_max_used * d * k >= 3.0)
