"""The Bayes oracle of the cluster simulation: the best any voxelwise estimator can do.

For each voxel, the posterior mean and standard deviation of (D, K) under the simulation's true
prior and its true likelihood (SCIENCE.md sections 5 and 7):

- prior: the truncated mixture the truth was drawn from (:mod:`vaemap_bids.simulate.clusters`):
  the cluster is drawn with the weights, then (D, K) from the cluster's Gaussian redrawn until
  physical, so ``p(x) = sum_c w_c N(x; m_c, v_c I) 1[x physical] / Z_c`` with ``Z_c`` the
  probability that cluster c's Gaussian is physical (0 < D <= D_hi, 0 <= K <= K_hi,
  b_max D K < 3), computed by adaptive quadrature;
- likelihood: Rician magnitudes ``m_i ~ Rice(phi_i(x), sigma)`` with S0 = 1, observed only after
  division by their own noisy mean b0 ``c``: ``y = m / c``. Changing variables from m to
  (y, c) (one b0 coordinate of y is fixed by mean(y_b0) = 1) and integrating c out gives

      p(y | x) ~ integral_0^inf prod_i Rice(c y_i; phi_i(x), sigma) c^(T - 1) dc

  (T volumes; without the renormalisation, c = 1 and there is no integral).

Computing it. With ``log I0(z) = log i0e(z) + z`` the log-integrand splits into a part that
depends on c alone, ``(2T - 1) log c - c^2 sum(y^2) / (2 sigma^2) + sum_b0 log I0(c y_i /
sigma^2)``, and one term per shell g of the diffusion-weighted volumes,
``-n_g nu_g^2 / (2 sigma^2) + t Y_g / sigma^2 + G_g(t)`` at ``t = c nu_g(x)``, with
``Y_g = sum_g y_i`` and ``G_g(t) = sum_g log i0e(t y_i / sigma^2)``. G_g is a function of one
variable: it is tabulated per voxel on the range of t the grid needs and interpolated by cubic
Hermite splines with its exact derivative. The c integral is a trapezoid rule on
``1 +- c_width sigma / sqrt(n_b0)`` (spectrally accurate for such smooth, peaked integrands);
the (D, K) integral is Gauss-Legendre on a box, K running in each D column from the box's
lower K to min(box's upper K, the physical edge), so the truncation is an integration limit and
not a discontinuity. The box is placed from a start (Rician maximum likelihood and its Fisher
sd; the whole domain without one) and then re-placed twice around the posterior itself
(mean +- ``width`` sd). Doubling every resolution and widening every range changes the result
by a negligible fraction of the posterior sd (tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: number of volumes' worth of terms computed at once (bounds the memory of a chunk)
_CHUNK_ELEMENTS = 6_000_000


@dataclass(frozen=True)
class OracleGrid:
    """Resolution of the oracle's quadrature (defaults: refining changes nothing, see tests)."""

    n_d: int = 56            # Gauss-Legendre nodes in D
    n_k: int = 24            # Gauss-Legendre nodes in K (per D column)
    n_c: int = 17            # trapezoid nodes of the b0 normaliser c
    c_width: float = 6.5     # c range: 1 +- c_width sigma / sqrt(n_b0)
    n_t: int = 257           # nodes of the tabulated G_g(t) (cubic Hermite)
    width: float = 8.0       # box: mean +- width sd
    passes: int = 4          # box placements (the first from the start)

    def coarse(self) -> "OracleGrid":
        """The grid of the passes that only place the box (a third of the nodes or so)."""
        return OracleGrid(n_d=max(12, self.n_d // 2), n_k=max(12, self.n_k // 2),
                          n_c=max(9, self.n_c // 2 + 1), c_width=self.c_width, n_t=self.n_t,
                          width=self.width, passes=self.passes)

    def refined(self) -> "OracleGrid":
        """Every resolution doubled and every range widened (for the convergence check)."""
        return OracleGrid(n_d=2 * self.n_d, n_k=2 * self.n_k, n_c=2 * self.n_c - 1,
                          c_width=1.25 * self.c_width, n_t=2 * self.n_t - 1,
                          width=1.25 * self.width, passes=self.passes + 1)


@dataclass
class Prior:
    """The truncated mixture: means (C, 2), per-parameter variances (C,), weights (C,), the
    physical domain (D_hi, K_hi, b_max) and the truncation masses Z (C,)."""

    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    d_hi: float
    k_hi: float
    b_max: float
    z: np.ndarray

    @classmethod
    def of(cls, means, variances, weights, model) -> "Prior":
        lo, hi = model.bounds()
        if lo[0] != 0.0 or lo[1] != 0.0:
            raise ValueError("the oracle expects the MS-DKI bounds D > 0, K >= 0")
        means = np.asarray(means, dtype=np.float64)
        variances = np.asarray(variances, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float64)
        prior = cls(means, variances, weights, float(hi[0]), float(hi[1]),
                    float(model.b_max_used), np.zeros(len(means)))
        prior.z = np.array([prior._mass(c) for c in range(len(means))])
        if np.any(prior.z <= 0):
            raise ValueError("a cluster of the prior has no mass in the physical domain")
        return prior

    def k_edge(self, d):
        """Largest physical K at D: min(K_hi, 3 / (b_max D))."""
        lib = torch if isinstance(d, torch.Tensor) else np
        return lib.minimum(lib.full_like(d, self.k_hi), 3.0 / (self.b_max * lib.clip(d, 1e-12, None)))

    def _mass(self, c: int) -> float:
        from scipy import integrate, stats

        (md, mk), sd = self.means[c], math.sqrt(self.variances[c])

        def column(d):
            return stats.norm.pdf(d, md, sd) * (stats.norm.cdf((self.k_edge(np.array(d)) - mk) / sd)
                                                - stats.norm.cdf(-mk / sd))

        kink = 3.0 / (self.b_max * self.k_hi)
        return float(integrate.quad(column, 0.0, self.d_hi, points=[kink] if kink < self.d_hi
                                    else None, limit=200, epsabs=1e-13, epsrel=1e-11)[0])

    def log_density(self, d: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """log p(D, K) inside the physical domain (the caller keeps the nodes inside it)."""
        terms = []
        for (md, mk), var, w, z in zip(self.means, self.variances, self.weights, self.z):
            if w <= 0:
                continue
            terms.append(math.log(w / z) - math.log(2 * math.pi * var)
                         - ((d - md) ** 2 + (k - mk) ** 2) / (2 * var))
        return torch.logsumexp(torch.stack(terms, 0), 0)


def _gauss_legendre(n: int, dtype, device):
    x, w = np.polynomial.legendre.leggauss(n)
    return (torch.as_tensor((x + 1) / 2, dtype=dtype, device=device),
            torch.as_tensor(w / 2, dtype=dtype, device=device))


def _log_i0e(z: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.special.i0e(z))


def _hermite(t_grid, f, df, t):
    """Cubic Hermite interpolation of f (n, M) with derivative df on uniform ``t_grid`` (n, M)
    at ``t`` (n, Q)."""
    lo_t, hi_t = t_grid[:, :1], t_grid[:, -1:]
    m = t_grid.shape[1]
    h = (hi_t - lo_t) / (m - 1)
    pos = ((t - lo_t) / h).clamp(0.0, m - 1.0)
    j = pos.floor().long().clamp(max=m - 2)
    u = pos - j.to(pos.dtype)
    f0, f1 = f.gather(1, j), f.gather(1, j + 1)
    d0, d1 = df.gather(1, j) * h, df.gather(1, j + 1) * h
    u2, u3 = u * u, u * u * u
    return ((2 * u3 - 3 * u2 + 1) * f0 + (u3 - 2 * u2 + u) * d0 + (-2 * u3 + 3 * u2) * f1
            + (u3 - u2) * d1)


def posterior_moments(model, y: np.ndarray, sigma: float, prior: Prior, *,
                      renormalised: bool = True, start: tuple[np.ndarray, np.ndarray] | None = None,
                      grid: OracleGrid = OracleGrid(), device="cpu", chunk: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and sd (each (N, 2): D, K) of the voxels ``y`` (N, T of
    ``model.acquisition``, divided by their noisy mean b0 when ``renormalised``), noise
    ``sigma`` of the raw magnitudes (S0 = 1). ``start`` = (estimate, sd) places the first box
    (else the whole domain)."""
    device = torch.device(device)
    dt = torch.float64
    acq = model.acquisition
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != acq.n_volumes:
        raise ValueError(f"y must be (voxels, {acq.n_volumes}), got {y.shape}")
    b0 = np.asarray(acq.b0_mask, dtype=bool)
    if renormalised and b0.sum() < 1:
        raise ValueError("renormalised signals need b0 volumes")
    shells = [np.flatnonzero(acq.bvals == b) for b in np.unique(acq.bvals[~b0])]
    bvals = [float(acq.bvals[idx[0]]) for idx in shells]
    n = y.shape[0]
    if start is None:
        centre = np.tile([prior.d_hi / 2, prior.k_hi / 2], (n, 1))
        half = np.tile([prior.d_hi, prior.k_hi], (n, 1))
    else:
        centre = np.asarray(start[0], dtype=np.float64)
        sd = np.asarray(start[1], dtype=np.float64)
        half = np.where(np.isfinite(sd) & (sd > 0), grid.width * sd,
                        np.array([prior.d_hi, prior.k_hi]))
        centre = np.where(np.isfinite(centre), centre, np.array([prior.d_hi / 2, prior.k_hi / 2]))
    per_voxel = grid.n_d * grid.n_k * grid.n_c * (len(shells) + 2) + grid.n_t * acq.n_volumes
    chunk = chunk or max(1, _CHUNK_ELEMENTS // per_voxel)
    mean = np.empty((n, 2))
    std = np.empty((n, 2))
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        yt = torch.as_tensor(y[lo:hi], dtype=dt, device=device)
        c_box = torch.as_tensor(centre[lo:hi], dtype=dt, device=device)
        h_box = torch.as_tensor(half[lo:hi], dtype=dt, device=device)
        slope = torch.zeros(hi - lo, dtype=dt, device=device)
        for step in range(grid.passes):
            # the first boxes are placed on a coarse grid, the last two passes use the full one
            g = grid if step >= grid.passes - 2 else grid.coarse()
            m, cov, res = _moments(yt, sigma, prior, b0, shells, bvals, c_box, h_box, slope,
                                   g, renormalised)
            # the next box: D within mean +- width sd, K within +- width conditional sd around
            # the posterior's regression line of K on D (a sheared box follows the D-K ridge);
            # a posterior narrower than this box's node spacing reads as (nearly) a point:
            # the next box then spans +- 4 spacings around it (a 3x zoom at 24 nodes)
            var_d = cov[:, 0, 0].clamp_min(0)
            slope = torch.where(var_d > 0, cov[:, 0, 1] / var_d.clamp_min(1e-300),
                                torch.zeros_like(var_d))
            var_k_given_d = (cov[:, 1, 1] - slope * cov[:, 0, 1]).clamp_min(0)
            spread = torch.stack([var_d.sqrt(), var_k_given_d.sqrt()], 1)
            c_box = m
            h_box = torch.maximum(grid.width * spread, 4.0 * res)
        mean[lo:hi] = m.cpu().numpy()
        std[lo:hi] = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0).sqrt().cpu().numpy()
    return mean, std


def _moments(y, sigma, prior, b0, shells, bvals, centre, half, slope, grid, renormalised):
    """One box: posterior mean (n, 2), covariance (n, 2, 2) and node spacing (n, 2) of every
    voxel of the chunk. The box: D in centre +- half[0]; in each D column, K in
    centre[1] + slope (D - centre[0]) +- half[1], cut to the physical domain."""
    dt, dev = y.dtype, y.device
    n, T = y.shape
    var = sigma * sigma
    # ---- (D, K) nodes: Gauss-Legendre in D, and in K over each column's physical range ------
    d_lo = (centre[:, 0] - half[:, 0]).clamp(min=0.0)
    d_hi = (centre[:, 0] + half[:, 0]).clamp(max=prior.d_hi)
    d_lo = torch.minimum(d_lo, d_hi - 1e-9).clamp(min=0.0)
    xd, wd = _gauss_legendre(grid.n_d, dt, dev)
    xk, wk = _gauss_legendre(grid.n_k, dt, dev)
    dspan = (d_hi - d_lo)[:, None]
    d = d_lo[:, None] + dspan * xd[None, :]                                   # (n, Nd)
    line = centre[:, 1:2] + slope[:, None] * (d - centre[:, 0:1])
    bottom = (line - half[:, 1:2]).clamp(min=0.0)
    top = torch.minimum(line + half[:, 1:2], prior.k_edge(d))                  # (n, Nd)
    kspan = (top - bottom).clamp(min=0.0)
    k = bottom[:, :, None] + kspan[:, :, None] * xk[None, None, :]            # (n, Nd, Nk)
    dd = d[:, :, None].expand_as(k)
    log_w = (torch.log(wd)[None, :, None] + torch.log(wk)[None, None, :]
             + torch.log(dspan)[:, :, None] + torch.log(kspan.clamp_min(1e-300))[:, :, None])
    log_w = torch.where(kspan[:, :, None] > 0, log_w, torch.full_like(log_w, -torch.inf))
    dd, k, log_w = dd.reshape(n, -1), k.reshape(n, -1), log_w.reshape(n, -1)
    log_node = prior.log_density(dd, k) + log_w                                # (n, X)
    # ---- c nodes ---------------------------------------------------------------------------
    n_b0 = int(b0.sum())
    if renormalised:
        s_c = sigma / math.sqrt(n_b0)
        u = torch.linspace(-grid.c_width, grid.c_width, grid.n_c, dtype=dt, device=dev)
        c = (1.0 + s_c * u)[None, :].expand(n, -1).clamp_min(1e-6)              # (n, C)
        sum_y2 = (y * y).sum(1, keepdim=True)
        yb = y[:, torch.as_tensor(b0, device=dev)]
        log_c = ((2 * T - 1) * torch.log(c) - c * c * sum_y2 / (2 * var)
                 + (_log_i0e(c[:, :, None] * yb[:, None, :] / var)
                    + c[:, :, None] * yb[:, None, :] / var).sum(2))
        log_c = log_c + math.log(s_c * 2 * grid.c_width / (grid.n_c - 1))      # trapezoid h
        trap = torch.ones(grid.n_c, dtype=dt, device=dev)
        trap[0] = trap[-1] = 0.5
        log_c = log_c + torch.log(trap)[None, :]
    else:
        c = torch.ones(n, 1, dtype=dt, device=dev)
        log_c = torch.zeros(n, 1, dtype=dt, device=dev)
    # ---- shells: -n_g nu^2 / 2s^2 + t Y_g / s^2 + G_g(t), t = c nu ---------------------------
    log_lik = log_c[:, None, :].expand(n, dd.shape[1], c.shape[1]).clone()      # (n, X, C)
    c_lo, c_hi = c.min(1, keepdim=True).values, c.max(1, keepdim=True).values
    for idx, b in zip(shells, bvals):
        yg = y[:, torch.as_tensor(idx, device=dev)]                              # (n, Ng)
        nu = torch.exp(-b * dd + (b * dd) ** 2 * k / 6.0)                         # (n, X)
        t_lo = c_lo * nu.min(1, keepdim=True).values
        t_hi = c_hi * nu.max(1, keepdim=True).values
        t_hi = torch.maximum(t_hi, t_lo * (1 + 1e-9) + 1e-300)
        tg = t_lo + (t_hi - t_lo) * torch.linspace(0, 1, grid.n_t, dtype=dt, device=dev)[None, :]
        z = tg[:, :, None] * yg[:, None, :] / var                                # (n, M, Ng)
        i0, i1 = torch.special.i0e(z), torch.special.i1e(z)
        g = torch.log(i0).sum(2)
        dg = ((i1 / i0 - 1.0) * yg[:, None, :] / var).sum(2)                     # d/dt log i0e
        t = (c[:, None, :] * nu[:, :, None]).reshape(n, -1)                      # (n, X*C)
        gt = _hermite(tg, g, dg, t).reshape(n, dd.shape[1], c.shape[1])
        y_sum = yg.sum(1)[:, None, None]
        log_lik += (-len(idx) * nu[:, :, None] ** 2 / (2 * var)
                    + c[:, None, :] * nu[:, :, None] * y_sum / var + gt)
    log_post = log_node + torch.logsumexp(log_lik, 2)                           # (n, X)
    w = torch.softmax(log_post, 1)
    md = (w * dd).sum(1)
    mk = (w * k).sum(1)
    ed, ek = dd - md[:, None], k - mk[:, None]
    cov = torch.stack([torch.stack([(w * ed * ed).sum(1), (w * ed * ek).sum(1)], 1),
                       torch.stack([(w * ed * ek).sum(1), (w * ek * ek).sum(1)], 1)], 1)
    res = torch.stack([(d_hi - d_lo) / grid.n_d, (kspan.amax(1)) / grid.n_k], 1)
    return torch.stack([md, mk], 1), cov, res


def oracle_for_simulation(sim, *, grid: OracleGrid = OracleGrid(), device="cpu",
                          start: tuple[np.ndarray, np.ndarray] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`posterior_moments` of a :class:`~vaemap_bids.simulate.clusters.Simulation`, with
    its own prior, noise and normalisation. Without ``start``, the first box comes from the
    Rician maximum-likelihood fit (``lsq``) with the true sigma / mean b0 and its Cramer-Rao sd."""
    prior = Prior.of(sim.cluster_means, sim.cluster_variances, sim.cluster_weights, sim.model)
    if start is None:
        from ..fitting import fit

        res = fit(sim.model, sim.noisy, "lsq", device=device, progress=False,
                  sigma=simulation_sigma(sim), options={"noise_model": "rician", "n_coils": 1})
        start = (res.params, res.std)
    return posterior_moments(sim.model, sim.noisy, sim.sigma, prior,
                             renormalised=sim.renormalised, start=start, grid=grid, device=device)


def simulation_sigma(sim) -> np.ndarray | float:
    """The noise sd of a simulation's signals as the pipeline would give it: the known sigma of
    the magnitudes divided by each voxel's noisy measured mean b0 (sigma itself when the signals
    were not renormalised)."""
    if not sim.renormalised:
        return float(sim.sigma)
    return float(sim.sigma) / np.asarray(sim.b0_mean, dtype=np.float64)
