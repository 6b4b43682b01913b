"""The least-squares peers that ``lsq`` is compared with, returning vaemap units.

- MS-DKI: ``dipy.reconst.msdki.MeanDiffusionKurtosisModel`` (dipy works in s/mm^2 and mm^2/s).
- Ball-stick: classic dmipy 1.0.5, ``G1Ball`` + ``C1Stick`` in a ``MultiCompartmentModel``
  (SI units: s/m^2 and m^2/s). dmipy is an optional extra: it is imported only when used.

Signals are b0-normalised rows (N, T) of the volumes of ``acquisition``; both peers estimate
their own S0 from the b0 volumes, which is 1 for such signals.
"""
from __future__ import annotations

import numpy as np

from ..physics.acquisition import Acquisition
from ..physics.base import SignalModel

#: b in ms/um^2 -> s/mm^2 (dipy) and -> s/m^2 (dmipy); a diffusivity goes back by the same
#: factor (mm^2/s -> um^2/ms is x1e3, m^2/s -> um^2/ms is x1e9).
MS_UM2_TO_S_MM2 = 1e3
MS_UM2_TO_S_M2 = 1e9


def _check_signals(acquisition: Acquisition, signals) -> np.ndarray:
    signals = np.asarray(signals, dtype=np.float64)
    if signals.ndim != 2 or signals.shape[1] != acquisition.n_volumes:
        raise ValueError(f"signals must have shape (voxels, {acquisition.n_volumes}), "
                         f"got {signals.shape}")
    if not np.all(np.isfinite(signals)):
        raise ValueError("signals contain NaN or infinite values; exclude those voxels first")
    return signals


def fit_msdki_dipy(acquisition: Acquisition, signals) -> np.ndarray:
    """dipy's MS-DKI fit (weighted log-linear least squares on the shell means).

    Returns (N, 2): mean signal diffusivity in um^2/ms and mean signal kurtosis. dipy does not
    constrain the estimates, so they can leave the physical domain at low SNR."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.msdki import MeanDiffusionKurtosisModel

    signals = _check_signals(acquisition, signals)
    gtab = gradient_table(acquisition.bvals * MS_UM2_TO_S_MM2, bvecs=acquisition.bvecs,
                          b0_threshold=acquisition.b0_threshold * MS_UM2_TO_S_MM2)
    fit = MeanDiffusionKurtosisModel(gtab).fit(signals)
    return np.stack([np.asarray(fit.msd) * MS_UM2_TO_S_MM2, np.asarray(fit.msk)], axis=1)


def _import_dmipy():
    try:
        from dmipy.core.acquisition_scheme import acquisition_scheme_from_bvalues
        from dmipy.core.modeling_framework import MultiCompartmentModel
        from dmipy.signal_models import cylinder_models, gaussian_models
        from dmipy.utils.utils import unitsphere2cart_Nd
    except ImportError as exc:
        raise ImportError(
            "the ball-stick reference fit needs classic dmipy 1.0.5, an optional extra: "
            "pip install --no-deps dmipy==1.0.5 (it is only used by lsq solver=reference and "
            f"the benchmarks) [{exc}]") from exc
    return (acquisition_scheme_from_bvalues, MultiCompartmentModel, cylinder_models,
            gaussian_models, unitsphere2cart_Nd)


def fit_ballstick_dmipy(acquisition: Acquisition, signals, solver: str = "brute2fine",
                        use_parallel_processing: bool = False) -> np.ndarray:
    """dmipy's ball + stick fit.

    Returns (N, 6): stick fraction, Dpar and Diso in um^2/ms, and the stick direction as a unit
    vector (dmipy's (theta, phi) converted). Only b-values and directions are passed to dmipy:
    this model does not need the pulse timing (and passing it hits a numpy-2 bug in 1.0.5)."""
    scheme_from_bvalues, MultiCompartmentModel, cylinder_models, gaussian_models, to_cart = \
        _import_dmipy()
    signals = _check_signals(acquisition, signals)
    scheme = scheme_from_bvalues(acquisition.bvals * MS_UM2_TO_S_M2, acquisition.bvecs,
                                 b0_threshold=acquisition.b0_threshold * MS_UM2_TO_S_M2)
    ball = gaussian_models.G1Ball()
    stick = cylinder_models.C1Stick()
    mcm = MultiCompartmentModel(models=[ball, stick])
    fit = mcm.fit(scheme, signals, solver=solver, use_parallel_processing=use_parallel_processing)
    p = fit.fitted_parameters
    names = {"diso": "G1Ball_1_lambda_iso", "dpar": "C1Stick_1_lambda_par",
             "mu": "C1Stick_1_mu", "fball": "partial_volume_0", "fstick": "partial_volume_1"}
    fstick = np.asarray(p[names["fstick"]], dtype=np.float64)
    # dmipy's fractions sum to one; renormalise anyway in case a version does not enforce it
    total = fstick + np.asarray(p[names["fball"]], dtype=np.float64)
    fstick = np.where(total > 0, fstick / np.where(total > 0, total, 1.0), fstick)
    dpar = np.asarray(p[names["dpar"]], dtype=np.float64) * MS_UM2_TO_S_M2
    diso = np.asarray(p[names["diso"]], dtype=np.float64) * MS_UM2_TO_S_M2
    direction = to_cart(np.asarray(p[names["mu"]], dtype=np.float64).reshape(-1, 2))
    return np.column_stack([fstick, dpar, diso, direction])


def fit_reference(model: SignalModel, signals) -> np.ndarray:
    """The peer of ``model`` on its volumes: dipy for ``msdki``, dmipy for ``ballstick``."""
    if model.name == "msdki":
        return fit_msdki_dipy(model.acquisition, signals)
    if model.name == "ballstick":
        return fit_ballstick_dmipy(model.acquisition, signals)
    raise ValueError(f"lsq solver=reference has no peer for model {model.name!r}; "
                     "use solver=torch")
