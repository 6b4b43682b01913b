"""The interface every signal model implements, and the registry that finds models by name.

A model is bound to an acquisition (dipy's ``Model(gtab)`` pattern): ``make_model("msdki", acq)``.
It chooses the volumes it uses, maps unconstrained network/solver outputs ("raw") into physical
bounds with a smooth squashing, and predicts the normalised signal S/S0 of those volumes, in torch
(differentiable, any device) and in numpy (simulation and tests).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from .acquisition import Acquisition


@dataclass(frozen=True)
class ParameterSpec:
    """One reported parameter. ``size`` is 3 for a direction (a unit vector map)."""

    label: str          # used in file names: param-<label>
    lo: float
    hi: float
    units: str          # BIDS/BEP016 Units string
    description: str
    size: int = 1

    @property
    def is_direction(self) -> bool:
        return self.size == 3


class SignalModel(ABC):
    """A forward model phi(b, g; x) bound to the volumes of an acquisition that it uses."""

    name: str = ""
    long_name: str = ""
    description: str = ""
    url: str = ""
    citation: str = ""
    parameters: tuple[ParameterSpec, ...] = ()

    def __init__(self, acquisition: Acquisition):
        self.check_acquisition(acquisition)
        self.full_acquisition = acquisition
        self.volumes = self.select_volumes(acquisition)
        self.acquisition = acquisition.subset(self.volumes)
        self._device_cache: dict = {}

    # ---- acquisition -------------------------------------------------------------------------
    @classmethod
    def check_acquisition(cls, acq: Acquisition) -> None:
        """Raise ValueError with a readable reason when the model cannot be fitted to ``acq``."""

    def select_volumes(self, acq: Acquisition) -> np.ndarray:
        """Boolean mask of the volumes this model uses (all of them by default)."""
        return np.ones(acq.n_volumes, dtype=bool)

    @property
    def n_measurements(self) -> int:
        return int(self.volumes.sum())

    def tensors(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """b-values and unit directions of the used volumes as tensors on ``device`` (cached)."""
        key = (str(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = (
                torch.as_tensor(self.acquisition.bvals, dtype=dtype, device=device),
                torch.as_tensor(self.acquisition.bvecs, dtype=dtype, device=device),
            )
        return self._device_cache[key]

    # ---- parameters --------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """Columns of a parameter array (a direction takes 3)."""
        return sum(p.size for p in self.parameters)

    @property
    def n_raw(self) -> int:
        """Unconstrained outputs a network or solver produces (same layout as the parameters)."""
        return self.n_params

    @classmethod
    def param_slices(cls) -> dict[str, slice]:
        out, start = {}, 0
        for p in cls.parameters:
            out[p.label] = slice(start, start + p.size)
            start += p.size
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-column lower and upper bounds of the parameter array (direction columns: -1, 1)."""
        lo, hi = [], []
        for p in self.parameters:
            lo += [p.lo] * p.size
            hi += [p.hi] * p.size
        return np.array(lo), np.array(hi)

    def squash(self, raw: torch.Tensor) -> torch.Tensor:
        """Map unconstrained ``raw`` (N, n_raw) into bounds: ``lo + (hi - lo) * sigmoid(u)`` for
        scalars, ``u / |u|`` for directions. Smooth everywhere, so gradients never vanish at a
        bound, and the returned value is exactly the one the forward model sees."""
        cols = []
        for p, sl in zip(self.parameters, self.param_slices().values()):
            u = raw[:, sl]
            if p.is_direction:
                cols.append(u / u.norm(dim=1, keepdim=True).clamp_min(1e-8))
            else:
                cols.append(p.lo + (p.hi - p.lo) * torch.sigmoid(u))
        return torch.cat(cols, dim=1)

    def unsquash(self, params: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`squash` (for initialising solvers from a known estimate)."""
        params = np.asarray(params, dtype=np.float64)
        raw = np.empty_like(params)
        for p, sl in zip(self.parameters, self.param_slices().values()):
            v = params[:, sl]
            if p.is_direction:
                raw[:, sl] = v
            else:
                frac = np.clip((v - p.lo) / (p.hi - p.lo), 1e-6, 1 - 1e-6)
                raw[:, sl] = np.log(frac) - np.log1p(-frac)
        return raw

    @classmethod
    def split(cls, params: np.ndarray) -> dict[str, np.ndarray]:
        """Parameter array (N, n_params) -> {label: (N,) or (N, 3)}."""
        params = np.asarray(params)
        out = {}
        for p, sl in zip(cls.parameters, cls.param_slices().values()):
            out[p.label] = params[:, sl] if p.is_direction else params[:, sl.start]
        return out

    # ---- forward -----------------------------------------------------------------------------
    @abstractmethod
    def forward(self, params: torch.Tensor) -> torch.Tensor:
        """Predicted S/S0, shape (N, n_measurements), from physical ``params`` (N, n_params)."""

    @abstractmethod
    def forward_numpy(self, params: np.ndarray, bvals: np.ndarray | None = None,
                      bvecs: np.ndarray | None = None) -> np.ndarray:
        """NumPy twin of :meth:`forward`; ``bvals``/``bvecs`` default to the used volumes."""

    def invalid_mask(self, params: np.ndarray) -> np.ndarray:
        """Voxels whose parameters are outside the model's physical domain (none by default)."""
        return np.zeros(len(params), dtype=bool)

    def at_bound_mask(self, params: np.ndarray, rel_tol: float = 1e-3) -> np.ndarray:
        """Voxels with any scalar parameter within ``rel_tol`` of the range of a bound."""
        hit = np.zeros(len(params), dtype=bool)
        for p, sl in zip(self.parameters, self.param_slices().values()):
            if p.is_direction:
                continue
            v = np.asarray(params)[:, sl.start]
            tol = rel_tol * (p.hi - p.lo)
            hit |= (v <= p.lo + tol) | (v >= p.hi - tol)
        return hit

    @classmethod
    def describe(cls) -> dict:
        """BEP016-style description of the model and its parameters, for sidecars and reports
        (a class method: no acquisition is needed)."""
        return {
            "Name": cls.name,
            "LongName": cls.long_name,
            "Description": cls.description,
            "URL": cls.url,
            "Citation": cls.citation,
            "Parameters": {p.label: {"Description": p.description, "Units": p.units,
                                     "Bounds": [p.lo, p.hi]} for p in cls.parameters},
        }


_REGISTRY: dict[str, type[SignalModel]] = {}


def register(cls: type[SignalModel]) -> type[SignalModel]:
    """Class decorator: make a model available to :func:`make_model` under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"model name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[SignalModel]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown signal model {name!r}; choose from {available_models()}") from None


def make_model(name: str, acquisition: Acquisition, **options) -> SignalModel:
    """The model ``name`` bound to ``acquisition`` (raises ValueError when it cannot be fitted)."""
    return get_model_class(name)(acquisition, **options)
