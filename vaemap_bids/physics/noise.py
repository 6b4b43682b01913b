"""Noise models of magnitude MRI: the negative log-likelihood every estimator minimises.

A magnitude image of one receive channel is Rician; the root-sum-of-squares of ``n_coils``
channels with equal noise is non-central chi with ``n_coils`` degrees of freedom (Rician is its
``n_coils = 1`` case):

    p(m | nu, s) = m^L / (s^2 nu^(L-1)) exp(-(m^2 + nu^2) / (2 s^2)) I_{L-1}(m nu / s^2)

Names (the ``noise_model`` option of every method): ``rician`` (one channel, or an adaptive
combination such as SENSE: ``n_coils`` must be 1), ``ncchi`` (root-sum-of-squares of
``n_coils`` channels), ``gaussian``. :func:`negative_log_likelihood` itself uses the ``n_coils``
it is given for both magnitude models; :func:`check_noise_options` (the options check) refuses
``rician`` with ``n_coils != 1``, so that a coil count is never silently ignored.

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

NOISE_MODELS = ("rician", "ncchi", "gaussian")
#: Terms of the power series of I_nu(x) for x < nu (each term shrinks by (x/2)^2 / (k (k + nu))).
_SERIES_TERMS = 64
_LOG_2PI = math.log(2.0 * math.pi)


def check_noise_model(noise_model: str, n_coils: int = 1) -> None:
    """Raise ValueError for an unknown noise model or a coil count that is not a positive int."""
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise_model!r}; choose from {list(NOISE_MODELS)}")
    if isinstance(n_coils, bool) or not isinstance(n_coils, int) or n_coils < 1:
        raise ValueError(f"n_coils must be a positive integer, got {n_coils!r}")


def check_noise_options(noise_model, n_coils) -> None:
    """The options check of every method: :func:`check_noise_model`, and ``rician`` is the
    single-channel case (``n_coils: 1``; use ``ncchi`` for more). Raises ValueError."""
    check_noise_model(noise_model, n_coils)
    if noise_model == "rician" and n_coils != 1:
        raise ValueError(f"noise_model rician is the single-channel case (n_coils: 1), got "
                         f"n_coils={n_coils}; use noise_model: ncchi for {n_coils} coils")


def effective_coils(noise_model: str, n_coils: int = 1) -> int:
    """Degrees of freedom / 2 of the magnitude model (1 for rician); 0 for gaussian."""
    check_noise_model(noise_model, n_coils)
    return 0 if noise_model == "gaussian" else int(n_coils)


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


# ---------------------------------------------------------------------------------------------
# Score and Fisher information in the noise-free signal nu (for Gauss-Newton / Fisher scoring)
# ---------------------------------------------------------------------------------------------
def score(measured: torch.Tensor, predicted: torch.Tensor, sigma, noise_model: str = "rician",
          n_coils: int = 1) -> torch.Tensor:
    """``d/d nu`` of :func:`negative_log_likelihood`, elementwise.

    Non-central chi with L channels: ``(nu - m R_L(m nu / s^2)) / s^2`` with
    ``R_L = I_L / I_{L-1}`` (Rician: ``I_1 / I_0``), from ``I'_n = I_{n+1} + (n / z) I_n``; the
    ``(L - 1) / nu`` terms of the density and of the Bessel derivative cancel exactly.
    Gaussian: ``(nu - m) / s^2``."""
    check_noise_model(noise_model, n_coils)
    sigma = torch.as_tensor(sigma, dtype=predicted.dtype, device=predicted.device)
    var = sigma * sigma
    if noise_model == "gaussian":
        return (predicted - measured) / var
    m = measured.clamp_min(0.0)
    nu = torch.maximum(predicted, 1e-6 * sigma)
    z = m * nu / var
    ratio = torch.exp(log_bessel_ie(n_coils, z) - log_bessel_ie(n_coils - 1, z))
    return (predicted - m * ratio) / var


#: Grid of a = nu / sigma on which the dimensionless Fisher information is tabulated; above the
#: last point it follows its asymptote 1 - c / a^2, c matched at the last point.
_FISHER_A_MAX = 40.0
_FISHER_A_STEP = 0.04
_fisher_tables: dict[int, "torch.Tensor"] = {}


def fisher_table(n_coils: int = 1):
    """``F_L(a) = sigma^2 E[(d nll / d nu)^2]`` at ``a = nu / sigma`` on a grid of step
    ``_FISHER_A_STEP`` up to ``_FISHER_A_MAX`` (float64 tensor, cached per coil count), by
    quadrature over the magnitude x in [max(0, a - 14), a + 14] (sigma = 1; 1,600 points, the
    density in log space so nothing overflows). ``F_L`` rises from 0 at a = 0 (nothing is learnt
    about a signal at the noise floor) to 1 (Gaussian)."""
    import numpy as np
    from scipy import special

    n_coils = int(n_coils)
    if n_coils < 1:
        raise ValueError(f"n_coils must be a positive integer, got {n_coils!r}")
    if n_coils in _fisher_tables:
        return _fisher_tables[n_coils]
    a = np.arange(0.0, _FISHER_A_MAX + _FISHER_A_STEP / 2, _FISHER_A_STEP)
    out = np.empty_like(a)
    order = n_coils - 1
    width = 14.0 + 2.0 * np.sqrt(n_coils)
    for j in range(0, a.size, 250):
        aj = a[j:j + 250, None]
        lo = np.maximum(aj - width, 0.0)
        x = lo + np.linspace(1e-12, 1.0, 1600)[None, :] * (aj + width - lo)
        z = x * aj
        with np.errstate(divide="ignore", invalid="ignore"):
            # log density of the magnitude (sigma = 1); a = 0 is the central chi with 2L dof
            log_p = np.where(aj > 0, n_coils * np.log(x) - order * np.log(np.where(aj > 0, aj, 1.0))
                             - (x - aj) ** 2 / 2 + np.log(special.ive(order, z)),
                             (2 * n_coils - 1) * np.log(x) - x * x / 2 - (n_coils - 1) * np.log(2)
                             - special.gammaln(n_coils))
            ratio = special.ive(n_coils, z) / special.ive(order, z)
        ratio = np.where(np.isfinite(ratio), ratio, 0.0)
        p = np.exp(np.where(np.isfinite(log_p), log_p, -np.inf))
        # the normalisation cancels: the ratio of two sums on the same grid
        out[j:j + 250] = (p * (x * ratio - aj) ** 2).sum(1) / p.sum(1)
    table = torch.as_tensor(np.clip(out, 0.0, 1.0), dtype=torch.float64)
    _fisher_tables[n_coils] = table
    return table


def fisher_information(predicted: torch.Tensor, sigma, noise_model: str = "rician",
                       n_coils: int = 1) -> torch.Tensor:
    """Expected information ``E[(d nll / d nu)^2]`` about the signal ``nu`` carried by one
    magnitude measurement: ``F_L(nu / sigma) / sigma^2`` (``sqrt F_L`` interpolated linearly
    in :func:`fisher_table`), ``1 / sigma^2`` for gaussian."""
    check_noise_model(noise_model, n_coils)
    sigma = torch.as_tensor(sigma, dtype=predicted.dtype, device=predicted.device)
    var = sigma * sigma
    if noise_model == "gaussian":
        return torch.ones_like(predicted) / var
    table = fisher_table(n_coils).to(device=predicted.device, dtype=predicted.dtype)
    a = predicted.clamp_min(0.0) / sigma
    pos = (a / _FISHER_A_STEP).clamp(max=table.numel() - 1.0)
    lo = pos.floor().long().clamp(max=table.numel() - 2)
    frac = pos - lo.to(pos.dtype)
    # sqrt(F) is linear in a near 0 (F ~ a^2), so it is the one interpolated
    root = table.sqrt()
    value = (root[lo] * (1 - frac) + root[lo + 1] * frac).square()
    # beyond the table: the asymptote 1 - c / a^2, continuous at the last point
    c = (1.0 - table[-1]) * _FISHER_A_MAX ** 2
    value = torch.where(a > _FISHER_A_MAX, 1.0 - c / a.clamp_min(_FISHER_A_MAX) ** 2, value)
    return value / var


def nll_and_score(measured: torch.Tensor, predicted: torch.Tensor, sigma,
                  noise_model: str = "rician", n_coils: int = 1, constants: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`negative_log_likelihood` and :func:`score` together, the Bessel functions
    evaluated once (what a solver calls at every step). ``constants=False`` leaves out the terms
    that depend on neither ``predicted`` nor anything a fit changes (``-L log m + 2 log s`` and
    the Gaussian ``log s + log(2 pi) / 2``): same minimiser, cheaper."""
    check_noise_model(noise_model, n_coils)
    sigma = torch.as_tensor(sigma, dtype=predicted.dtype, device=predicted.device)
    var = sigma * sigma
    if noise_model == "gaussian":
        diff = predicted - measured
        out = 0.5 * diff * diff / var
        if constants:
            out = out + torch.log(sigma) + 0.5 * _LOG_2PI
        return out, diff / var
    m = measured.clamp_min(0.0)
    nu = torch.maximum(predicted, 1e-6 * sigma)
    z = m * nu / var
    order = n_coils - 1
    if order == 0:
        ie_lo, ie_hi = torch.special.i0e(z), torch.special.i1e(z)
        log_lo = torch.log(ie_lo)
        ratio = ie_hi / ie_lo
    else:
        log_lo = log_bessel_ie(order, z)
        ratio = torch.exp(log_bessel_ie(n_coils, z) - log_lo)
    out = (m - nu) ** 2 / (2.0 * var) - log_lo
    if order:
        out = out + order * torch.log(nu)
    if constants:
        log_m = torch.log(m.clamp_min(torch.finfo(m.dtype).tiny))
        out = out - n_coils * log_m + 2.0 * torch.log(sigma)
    return out, (predicted - m * ratio) / var
