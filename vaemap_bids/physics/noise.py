"""Noise models of magnitude MRI: the negative log-likelihood every estimator minimises.

A magnitude image of one receive channel is Rician; the root-sum-of-squares of ``n_coils``
channels with equal noise is non-central chi with ``n_coils`` degrees of freedom (Rician is its
``n_coils = 1`` case):

    p(m | nu, s) = m^L / (s^2 nu^(L-1)) exp(-(m^2 + nu^2) / (2 s^2)) I_{L-1}(m nu / s^2)

``gaussian`` treats the noise as additive and Gaussian (the squared-error loss up to a constant),
which reads the Rician noise floor as signal. Everything is elementwise and differentiable in
torch (any device); ``s`` broadcasts, so a per-voxel sigma (N, 1) can meet signals (N, T).

Bessel functions. ``log I_0(x) = log(i0e(x)) + x`` (and ``I_1`` likewise) never overflows, and
the likelihood uses the scaled form so that float32 keeps its precision at high SNR. Higher
orders come from the three-term recurrence ``I_{n+1} = I_{n-1} - (2n / x) I_n``, which is stable
upward where ``x >= n``; below that the power series is summed (it converges fast there).
"""
from __future__ import annotations

import math

import torch

NOISE_MODELS = ("rician", "gaussian")
#: Terms of the power series of I_nu(x) for x < nu (each term shrinks by (x/2)^2 / (k (k + nu))).
_SERIES_TERMS = 64
_LOG_2PI = math.log(2.0 * math.pi)


def check_noise_model(noise_model: str, n_coils: int = 1) -> None:
    """Raise ValueError for an unknown noise model or a coil count that is not a positive int."""
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise_model!r}; choose from {list(NOISE_MODELS)}")
    if isinstance(n_coils, bool) or not isinstance(n_coils, int) or n_coils < 1:
        raise ValueError(f"n_coils must be a positive integer, got {n_coils!r}")


def log_bessel_ie(order: int, x: torch.Tensor) -> torch.Tensor:
    """``log(I_order(x) e^-x)`` for an integer ``order >= 0`` and ``x >= 0``: the exponentially
    scaled Bessel function, which never overflows (``log I = log_bessel_ie + x``)."""
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    x = torch.as_tensor(x)
    if order == 0:
        return torch.log(torch.special.i0e(x))
    if order == 1:
        return torch.log(torch.special.i1e(x))
    work = x.double()
    safe = work.clamp_min(1e-300)
    # upward recurrence on the scaled functions (the factor e^-x is common to all orders)
    prev, cur = torch.special.i0e(work), torch.special.i1e(work)
    for n in range(1, order):
        prev, cur = cur, prev - (2.0 * n / safe) * cur
    upward = torch.log(cur.clamp_min(1e-300))
    # power series: I_v(x) = sum_k (x/2)^(2k+v) / (k! (k+v)!), summed in log space
    half = torch.log(safe / 2.0)
    k = torch.arange(_SERIES_TERMS, dtype=work.dtype, device=work.device)
    log_terms = ((2.0 * k + order) * half.unsqueeze(-1)
                 - torch.lgamma(k + 1.0) - torch.lgamma(k + order + 1.0))
    series = torch.logsumexp(log_terms, dim=-1) - work
    out = torch.where(work >= order, upward, series)
    return out.to(x.dtype if x.is_floating_point() else torch.get_default_dtype())


def log_bessel_i(order: int, x: torch.Tensor) -> torch.Tensor:
    """``log I_order(x)`` for an integer ``order >= 0`` and ``x >= 0``, without overflow."""
    x = torch.as_tensor(x)
    return log_bessel_ie(order, x) + x


def negative_log_likelihood(measured: torch.Tensor, predicted: torch.Tensor, sigma,
                            noise_model: str = "rician", n_coils: int = 1) -> torch.Tensor:
    """Elementwise ``-log p(measured | predicted, sigma)``.

    ``measured`` is a magnitude (>= 0; negative values, which only a Gaussian model allows, are
    taken as 0 by the magnitude models), ``predicted`` the noise-free signal nu >= 0 and
    ``sigma`` the noise standard deviation of one channel, on the same scale (after b0
    normalisation: sigma / S0 of the voxel)."""
    check_noise_model(noise_model, n_coils)
    sigma = torch.as_tensor(sigma, dtype=predicted.dtype, device=predicted.device)
    var = sigma * sigma
    if noise_model == "gaussian":
        return 0.5 * (measured - predicted) ** 2 / var + torch.log(sigma) + 0.5 * _LOG_2PI
    m = measured.clamp_min(0.0)
    # a signal far below the noise is indistinguishable from none; the floor keeps nu^(L-1) and
    # I_{L-1}(z) ~ (z/2)^(L-1) (which cancel) representable
    nu = torch.maximum(predicted, 1e-6 * sigma)
    z = m * nu / var
    order = n_coils - 1
    log_m = torch.log(m.clamp_min(torch.finfo(m.dtype).tiny))
    # (m^2 + nu^2) / (2 s^2) - log I(z) = (m - nu)^2 / (2 s^2) - log(I(z) e^-z): no cancellation
    # of two huge terms at high SNR, so float32 keeps its precision
    out = (-(n_coils * log_m) + 2.0 * torch.log(sigma) + (m - nu) ** 2 / (2.0 * var)
           - log_bessel_ie(order, z))
    if order:
        out = out + order * torch.log(nu)
    return out


def mean_signal_bias_floor(sigma: float, n_coils: int = 1) -> float:
    """Mean magnitude of pure noise, sigma sqrt(pi/2) for Rician (the "noise floor")."""
    # E|m| of a central chi with 2L degrees of freedom scaled by sigma
    return float(sigma * math.sqrt(2.0) * math.exp(math.lgamma(n_coils + 0.5)
                                                   - math.lgamma(n_coils)))
