"""The estimator registry, what every estimator returns, the device choice, and the shared
input checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..physics.base import SignalModel


@dataclass(frozen=True)
class Estimator:
    """One method of the command line (``--methods``; ``desc-<name>`` in file names).

    ``outputs`` are the per-voxel results it gives beside the parameter maps, each of which the
    derivatives table turns into files: ``std`` (posterior or Laplace standard deviation),
    ``responsibilities`` (soft clustering: dseg + probseg), ``latent`` (posterior means)."""

    name: str
    description: str        # the sidecars' Model.FitMethodDescription
    network: bool           # trained on the subject's data (a GPU node when there is a GPU)
    outputs: tuple[str, ...] = ()
    default: bool = True    # in the default --methods
    spatial: bool = False   # needs each voxel's neighbours (fit(voxel_coords=...))


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("lsq", "Voxelwise maximum likelihood (Rician or non-central chi magnitude "
              "noise; Gaussian = non-linear least squares), with the Cramer-Rao standard "
              "deviation at the estimate.", network=False, outputs=("std",)),
    Estimator("ssl", "Voxelwise self-supervised network (Lim et al. 2022): an MLP maps each "
              "voxel's signal to the model's parameters, trained by maximum likelihood under the "
              "noise model (Rician by default).", network=True),
    Estimator("vaeunig", "Self-supervised variational autoencoder with a univariate Gaussian "
              "latent prior (Xu et al., arXiv:2411.10772), trained on the ELBO of the noise "
              "model's likelihood; maps and std are the posterior mean and standard deviation of "
              "the parameters (refined per voxel: MAP and Laplace posterior under the prior "
              "re-estimated on the subject's voxels).", network=True, outputs=("std", "latent")),
    Estimator("vaegmm", "Self-supervised variational autoencoder with a Gaussian-mixture latent "
              "prior (Xu et al., arXiv:2411.10772), the mixture enumerated exactly in the ELBO "
              "of the noise model's likelihood; maps and std are the posterior mean and standard "
              "deviation of the parameters over the mixture (refined per voxel: MAP and Laplace "
              "posterior under the prior re-estimated on the subject's voxels), and the "
              "responsibilities give a soft clustering of the voxels.", network=True,
              outputs=("std", "responsibilities", "latent")),
    Estimator("svae", "Spatial self-supervised variational autoencoder with a Gaussian-mixture "
              "prior whose component means are each voxel's neighbours of the same component "
              "(edge-aware borrowing, spatially regularised S0) and a Rician likelihood; maps "
              "are posterior means, and the mixture responsibilities give a soft clustering of "
              "the voxels.", network=True, outputs=("std", "responsibilities", "latent"),
              default=False, spatial=True),
)}
METHODS = tuple(ESTIMATORS)
NETWORK_METHODS = tuple(name for name, e in ESTIMATORS.items() if e.network)
#: What ``--methods`` runs when not given (svae is opt-in: it needs neighbours and more time).
DEFAULT_METHODS = tuple(name for name, e in ESTIMATORS.items() if e.default)
SPATIAL_METHODS = tuple(name for name, e in ESTIMATORS.items() if e.spatial)


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}") from None


class DeviceUnavailableError(RuntimeError):
    """The device asked for is not there (the CLI maps this to exit code 75)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU raises, never falls back."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device {device} was asked for but no CUDA GPU is visible to PyTorch")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")


@dataclass
class FitResult:
    """Per-voxel estimates of one (model, method) fit.

    ``params`` rows are NaN where ``valid`` is False (voxels excluded for non-finite input).
    VAE methods report the posterior mean of the parameters and ``std``, their per-voxel
    posterior standard deviation; ssl its point estimate; ``lsq`` its maximum-likelihood
    estimate and the Cramer-Rao standard deviation there.
    """

    model: str
    method: str
    params: np.ndarray
    valid: np.ndarray
    std: np.ndarray | None = None
    responsibilities: np.ndarray | None = None
    latent_mean: np.ndarray | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    seed: int = 0
    #: network methods: ``predict(signals, sigma=None) -> (params, std)`` runs the trained network
    #: on new b0-normalised voxels (N, T) without retraining; in memory only, never serialised
    predict: Callable | None = field(default=None, repr=False, compare=False)


def prepare_signals(model: SignalModel, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check b0-normalised ``signals`` (N, T of the model's full acquisition) and return
    ``(y, valid)``: the model's volumes of the finite voxels, float32, and the finite-row mask."""
    signals = np.asarray(signals)
    if signals.ndim != 2:
        raise ValueError(f"signals must be 2-D (voxels, volumes), got shape {signals.shape}")
    n_full = model.full_acquisition.n_volumes
    if signals.shape[1] == n_full:
        signals = signals[:, model.volumes]
    elif signals.shape[1] != model.n_measurements:
        raise ValueError(f"signals have {signals.shape[1]} volumes but the acquisition has "
                         f"{n_full} b-values ({model.n_measurements} used by {model.name})")
    valid = np.all(np.isfinite(signals), axis=1)
    if not valid.any():
        raise ValueError("no voxel has finite signals to fit")
    if valid.all():  # no copy of a whole-brain array when nothing needs excluding
        return np.ascontiguousarray(signals, dtype=np.float32), valid
    return np.ascontiguousarray(signals[valid], dtype=np.float32), valid


def scatter_rows(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Put rows fitted on ``valid`` voxels back into a full-length array, NaN elsewhere."""
    out = np.full((valid.size,) + values.shape[1:], np.nan, dtype=np.float32)
    out[valid] = values
    return out
