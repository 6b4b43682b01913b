"""Per-voxel non-linear least squares (method ``lsq``).

Our own solver is a batched Levenberg-Marquardt in torch: every voxel is an independent small
problem with its own damping, all voxels of a chunk advance together, and voxels that have
converged leave the active set so that the work shrinks as the fit goes. The solver optimises
the model's unconstrained ``raw`` vector and reports ``model.squash(raw)``, so every estimate is
inside the bounds and exactly what produced the fitted signal (MS-DKI stays physical).

- MS-DKI is isotropic, so the per-volume sum of squares equals a count-weighted sum of squares
  of the shell means (plus a constant): the fit runs on the shell means, started from the
  closed-form log-linear solution.
- Ball-stick uses an analytic Jacobian, a DTI principal eigenvector as the start direction and a
  grid over (Dpar, Diso) with the best fraction in closed form for each point; the ``n_starts``
  best grid points are refined and the best end point is kept.
- Any other registered model falls back on forward-mode automatic differentiation
  (``torch.autograd.forward_ad``) from the middle of its bounds plus seeded random starts.

Noise model (``noise_model`` option, SCIENCE.md 7). ``gaussian`` is the least squares above.
``rician`` (default) and ``ncchi`` (``n_coils`` channels) are maximum likelihood: the
least-squares solution is refined by Fisher scoring, a damped Gauss-Newton step on the exact
negative log-likelihood (:func:`vaemap_bids.physics.noise.negative_log_likelihood`) whose
curvature is the expected information ``J^T diag(F(nu / sigma) / sigma^2) J``
(:func:`~vaemap_bids.physics.noise.fisher_information`): positive definite, and close to the
least-squares curvature where the signal is well above the noise floor, so a few steps
suffice. The magnitude model needs the noise level ``sigma`` of the b0-normalised signal
(sigma / S0, a scalar or one value per voxel). MS-DKI's likelihood is per volume, with each
volume's signal taken at its shell's mean b (exact when the within-shell signal is isotropic,
as in the simulation; on real anisotropic tissue the directional spread within a shell is read
as noise).

Uncertainty. Every torch fit also returns the Cramer-Rao standard deviation of each output
parameter: the square root of the diagonal of the inverse Fisher information at the optimum,
computed directly in the output parameters (which is the raw-space inverse carried through the
squashing Jacobian, without its saturation at a bound), ``sigma^2 (J^T J)^-1`` for gaussian.
A direction's 3-vector gets the pseudo-inverse (its length is not identified). At a bound the
interval ignores the bound.

``solver: reference`` runs the peers instead (dipy for MS-DKI, classic dmipy for ball-stick; see
:mod:`vaemap_bids.fitting.reference`). Those are Gaussian least squares whatever
``noise_model`` says (the record says so), and give no std.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from tqdm.auto import tqdm

from ..physics.acquisition import Acquisition
from ..physics.ballstick import BallStick
from ..physics.base import SignalModel
from ..physics.msdki import VALIDITY_MARGIN, MeanSignalDKI
from .base import FitResult, scatter_rows
from .options import method_options

log = logging.getLogger("vaemap.fitting.lsq")

SOLVERS = ("torch", "reference")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: |raw| limit of the scalar parameters: sigmoid(15) = 1 - 3e-7, i.e. on the bound; without a
#: limit a parameter that belongs on a bound walks to infinity in ever larger steps.
RAW_LIMIT = 15.0
LAMBDA_START = 1e-2
LAMBDA_MIN = 1e-7
LAMBDA_MAX = 1e7
#: Damping floor relative to the largest curvature, so that flat directions (a direction vector's
#: length, a saturated sigmoid) never make the damped system singular.
DIAG_FLOOR = 1e-6

# A residual evaluator: (raw of some rows, those row indices) -> (residuals (n, M), transposed
# Jacobian of the residuals with respect to the local step coordinates (n, P, M)).
Evaluator = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# A retraction: (raw (n, R), step (n, P)) -> the raw reached by that step (n, R).
Retraction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
def resolve_options(model: SignalModel | str, options: dict | None) -> dict:
    """The ``lsq`` defaults for ``model`` (an instance or a name) updated with ``options``,
    checked."""
    opts = method_options("lsq", options, getattr(model, "name", model))
    if opts["solver"] not in SOLVERS:
        raise ValueError(f"lsq option solver={opts['solver']!r}; choose from {list(SOLVERS)}")
    if opts["dtype"] not in DTYPES:
        raise ValueError(f"lsq option dtype={opts['dtype']!r}; choose from {list(DTYPES)}")
    for key in ("max_iter", "n_starts", "batch_size"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lsq option {key} must be a positive integer, got {value!r}")
    if not float(opts["tolerance"]) > 0:
        raise ValueError(f"lsq option tolerance must be positive, got {opts['tolerance']!r}")
    for key in ("grid_dpar", "grid_diso"):
        grid = np.asarray(opts[key], dtype=float)
        if grid.ndim != 1 or grid.size < 1 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
            raise ValueError(f"lsq option {key} must be a non-empty list of positive numbers")
    from .options import check_noise
    check_noise("lsq", opts)
    return opts


# ---------------------------------------------------------------------------------------------
# Entry point used by vaemap_bids.fitting.fit
# ---------------------------------------------------------------------------------------------
def fit_lsq(model: SignalModel, y: np.ndarray, valid: np.ndarray, *, device: torch.device,
            seed: int = 0, options: dict | None = None, progress: bool = True,
            sigma=None) -> FitResult:
    """Least-squares / maximum-likelihood fit of the finite voxels ``y`` (n_valid,
    n_measurements), b0-normalised; ``sigma`` is the noise sd of those signals (a scalar or one
    value per row of ``y``), estimated from the data when None (see
    :func:`vaemap_bids.fitting.sigma.estimate_normalised_sigma`; recorded in
    ``hyperparameters['noise']``).

    Returns a :class:`FitResult` whose rows follow ``valid`` (NaN where it is False), with the
    Cramer-Rao ``std`` (torch solver)."""
    from .sigma import NoNoiseError, check_sigma, estimate_normalised_sigma

    opts = resolve_options(model, options)
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 2 or y.shape[1] != model.n_measurements:
        raise ValueError(f"lsq expects signals of shape (voxels, {model.n_measurements}), "
                         f"got {y.shape}")
    if y.shape[0] != int(np.count_nonzero(valid)):
        raise ValueError(f"{y.shape[0]} signal rows but {int(np.count_nonzero(valid))} valid voxels")
    device = torch.device(device)
    noise_model, n_coils = opts["noise_model"], int(opts["n_coils"])
    start = time.perf_counter()
    std = None
    settings = dict(device=device, seed=seed, max_iter=opts["max_iter"],
                    tolerance=float(opts["tolerance"]), n_starts=opts["n_starts"],
                    batch_size=opts["batch_size"], dtype=opts["dtype"],
                    grid_dpar=opts["grid_dpar"], grid_diso=opts["grid_diso"])
    fitted_model = "gaussian" if opts["solver"] == "reference" else noise_model
    if sigma is None:
        try:
            sigma, noise = estimate_normalised_sigma(model, y, fitted_model, n_coils, **settings)
        except NoNoiseError as exc:
            log.warning("%s/lsq: %s; fitting Gaussian least squares", model.name, exc)
            noise_model = fitted_model = "gaussian"
            sigma, noise = NOISE_FREE_SIGMA, {"sigma_source": "none (noise-free signals)"}
    else:
        sigma = check_sigma(sigma, y.shape[0])
        noise = {"sigma_source": "given"}
    noise = {"model": fitted_model, "n_coils": n_coils if fitted_model != "gaussian" else 1,
             **noise, **_sigma_summary(sigma), "std": STD_DESCRIPTION[fitted_model]}
    if opts["solver"] == "reference":
        from .reference import fit_reference
        params = fit_reference(model, y)
        used_device = "cpu"
        noise["asked"] = noise_model
        noise["note"] = "solver reference (dipy/dmipy) is Gaussian least squares"
        std = reference_std(model, params, sigma)
    else:
        params, std = solve_lsq(model, y, noise_model=noise_model, n_coils=n_coils, sigma=sigma,
                                return_std=True, progress=progress, **settings)
        used_device = str(device)
    seconds = time.perf_counter() - start
    n_out = int(np.count_nonzero(model.invalid_mask(params)))
    if n_out:
        log.warning("%s/lsq: %d voxels outside the physical domain", model.name, n_out)
    hyper = dict(opts)
    hyper["noise"] = noise
    return FitResult(model=model.name, method="lsq", params=scatter_rows(params, valid),
                     valid=np.asarray(valid, dtype=bool),
                     std=None if std is None else scatter_rows(std, valid), history={},
                     hyperparameters=hyper,
                     timings={"fit_seconds": seconds,
                              "voxels_per_second": y.shape[0] / max(seconds, 1e-12)},
                     device=used_device, seed=int(seed))


#: sigma/S0 used for the std of signals without measurable noise (its std is then ~0, honestly)
NOISE_FREE_SIGMA = 1e-6

STD_DESCRIPTION = {
    "gaussian": "Cramer-Rao sd of least squares at the estimate: sigma^2 (J^T J)^-1, with the "
                "error of the noisy b0 normaliser carried to first order",
    "rician": "Cramer-Rao sd at the maximum-likelihood estimate: inverse expected Fisher "
              "information of the Rician likelihood, the signal amplitude a nuisance parameter",
    "ncchi": "Cramer-Rao sd at the maximum-likelihood estimate: inverse expected Fisher "
             "information of the non-central chi likelihood, the signal amplitude a nuisance "
             "parameter",
}


def reference_std(model: SignalModel, params: np.ndarray, sigma) -> np.ndarray:
    """The Gaussian Cramer-Rao std (see :func:`cramer_rao_std`) at a peer's estimate; NaN where
    the peer's estimate is not finite."""
    params = np.asarray(params, dtype=np.float64)
    ok = np.all(np.isfinite(params), axis=1)
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (params.shape[0],))
    out = np.full(params.shape, np.nan, dtype=np.float32)
    if ok.any():
        b0 = torch.as_tensor(np.asarray(model.acquisition.b0_mask, dtype=bool))
        with torch.no_grad():
            std = cramer_rao_std(model, torch.as_tensor(params[ok]),
                                 torch.as_tensor(np.array(sig[ok], dtype=np.float64))[:, None],
                                 "gaussian", b0=b0)
        out[ok] = std.float().numpy()
    return out


def _sigma_summary(sigma) -> dict:
    """The sigma a fit used, for the record: the value, or the median and range per voxel."""
    arr = np.asarray(sigma, dtype=np.float64)
    if arr.ndim == 0 or arr.size == 1:
        return {"sigma": float(arr.reshape(-1)[0])}
    return {"sigma": "per voxel", "sigma_median": float(np.median(arr)),
            "sigma_min": float(arr.min()), "sigma_max": float(arr.max())}


def solve_lsq(model: SignalModel, y: np.ndarray, *, device="cpu", seed: int = 0,
              max_iter: int = 50, tolerance: float = 1e-6, n_starts: int = 1,
              batch_size: int = 32768, dtype: str = "float32",
              grid_dpar=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
              grid_diso=(0.1, 0.3, 0.6, 1.0, 1.5, 2.0, 2.6, 3.2),
              progress: bool = False, noise_model: str = "gaussian", n_coils: int = 1,
              sigma=None, return_std: bool = False):
    """Our batched torch solver: physical parameters (N, model.n_params), float32.

    ``y`` holds the model's volumes, b0-normalised, all finite. Voxels are processed in chunks of
    ``batch_size`` (each start of a multi-start fit counts), which bounds the memory.
    ``noise_model`` gaussian is least squares; rician / ncchi refine that solution to the
    maximum of the likelihood and need ``sigma`` (a scalar or (N,), the noise sd of ``y``).
    ``return_std`` (needs ``sigma``) also returns the Cramer-Rao std (N, n_params):
    ``(params, std)``."""
    from ..physics.noise import check_noise_model

    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 2 or y.shape[1] != model.n_measurements:
        raise ValueError(f"lsq expects signals of shape (voxels, {model.n_measurements}) for "
                         f"{model.name}, got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("lsq signals contain NaN or infinite values; exclude those voxels first")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_noise_model(noise_model, n_coils)
    need_sigma = noise_model != "gaussian" or return_std
    if need_sigma and sigma is None:
        raise ValueError(f"noise_model {noise_model} / return_std need sigma (the noise sd of "
                         "the b0-normalised signals)")
    sig = None
    if sigma is not None:
        from .sigma import check_sigma
        sig = np.broadcast_to(check_sigma(sigma, y.shape[0]), (y.shape[0],))
    device = torch.device(device)
    tdtype = DTYPES[dtype]
    settings = dict(max_iter=int(max_iter), tolerance=float(tolerance))
    if isinstance(model, MeanSignalDKI):
        problem = _MeanSignalProblem(model, device, **settings)
        starts = 1
    elif isinstance(model, BallStick):
        problem = _BallStickProblem(model, device, tdtype, n_starts=n_starts,
                                    grid_dpar=grid_dpar, grid_diso=grid_diso, **settings)
        starts = n_starts
    else:
        problem = _GenericProblem(model, device, tdtype, n_starts=n_starts, seed=seed, **settings)
        starts = n_starts
    chunk = max(1, int(batch_size) // starts)
    # signals divided by their own noisy mean b0: the magnitude fits free the amplitude, the
    # least-squares std carries the normaliser's error (see cramer_rao_std)
    b0 = torch.as_tensor(np.asarray(model.acquisition.b0_mask, dtype=bool), device=device)
    has_b0 = bool(b0.any())
    out = np.empty((y.shape[0], model.n_params), dtype=np.float32)
    std = np.empty_like(out) if return_std else None
    with torch.no_grad(), tqdm(total=y.shape[0], unit="voxel", desc=f"lsq {model.name}",
                               disable=not progress, leave=False) as bar:
        for lo in range(0, y.shape[0], chunk):
            hi = min(lo + chunk, y.shape[0])
            y_dev = torch.from_numpy(y[lo:hi]).to(device)
            raw = problem.solve_raw(y_dev)
            s_dev = None if sig is None else torch.as_tensor(
                np.array(sig[lo:hi], dtype=np.float64), dtype=torch.float64, device=device)[:, None]
            amp = None
            if noise_model != "gaussian":
                # first at the amplitude 1 (from the least-squares point, which the noise floor
                # can put near a bound), then with the amplitude free from there
                raw, amp = refine_likelihood(problem, y_dev, s_dev, raw, noise_model, n_coils)
                if has_b0:
                    raw, amp = refine_likelihood(problem, y_dev, s_dev, raw, noise_model,
                                                 n_coils, free_scale=True)
            params = model.squash(raw)
            out[lo:hi] = params.float().cpu().numpy()
            if return_std:
                std[lo:hi] = cramer_rao_std(model, params.double(), s_dev, noise_model, n_coils,
                                            scale=amp, b0=b0).float().cpu().numpy()
            bar.update(hi - lo)
    return (out, std) if return_std else out


# ---------------------------------------------------------------------------------------------
# The batched Levenberg-Marquardt core
# ---------------------------------------------------------------------------------------------
def levenberg_marquardt(evaluate: Evaluator, raw0: torch.Tensor, *, max_iter: int,
                        tolerance: float, retract: Retraction | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``sum(r**2)`` of every row independently from ``raw0`` (n, R).

    ``evaluate(raw, rows)`` gives the residuals (n, M) and the transposed Jacobian (n, P, M)
    with respect to P local step coordinates; ``retract(raw, step)`` moves ``raw`` by a step
    (default: ``raw + step`` with scalars kept within +-RAW_LIMIT, P = R). The Gauss-Newton
    case of :func:`damped_newton` (gradient J^T r, curvature J^T J; the common factor 2 cancels
    in the step). Returns the final ``raw`` and cost of every row."""

    def full(raw, rows):
        r, jac_t = evaluate(raw, rows)
        grad, hess = _normal_equations(r, jac_t)
        return r.square().sum(1), grad, hess

    return damped_newton(full, raw0, max_iter=max_iter, tolerance=tolerance, retract=retract)


def damped_newton(evaluate, raw0: torch.Tensor, *, max_iter: int, tolerance: float,
                  retract: Retraction | None = None, gain_scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise a cost of every row independently from ``raw0`` (n, R) by Levenberg-Marquardt
    damped steps on a positive semi-definite curvature.

    ``evaluate(raw, rows)`` gives the cost (n,), its gradient (n, P) and the curvature (n, P, P)
    (Gauss-Newton or expected Fisher information) in P local step coordinates.

    Each row has its own damping ``lambda`` (Marquardt scaling by the curvature diagonal): a step
    that lowers the cost is taken and ``lambda`` shrinks, otherwise ``lambda`` grows. A row stops
    when an accepted step lowers its cost by less than ``tolerance`` times ``gain_scale`` (default:
    the cost itself, i.e. a relative decrease; a log-likelihood, which may be negative, passes a
    fixed scale), or when ``lambda`` exceeds its ceiling; stopped rows leave the batch."""
    retract = retract or _additive_step
    raw = raw0.clone()
    n = raw.shape[0]
    rows = torch.arange(n, device=raw.device)
    cost, grad, hess = evaluate(raw, rows)
    cost, grad, hess = cost.clone(), grad.clone(), hess.clone()
    lam = torch.full((n,), LAMBDA_START, dtype=raw.dtype, device=raw.device)
    active = rows[torch.isfinite(cost)]
    tiny = torch.finfo(raw.dtype).tiny
    for _ in range(max_iter):
        if active.numel() == 0:
            break
        h = hess[active]
        diag = torch.diagonal(h, dim1=1, dim2=2)
        floor = DIAG_FLOOR * diag.amax(1, keepdim=True) + tiny
        system = h + torch.diag_embed(lam[active, None].to(h.dtype) * (diag + floor))
        # the P x P systems are small: solve them in float64 whatever the working precision
        step = torch.linalg.solve(system.double(), -grad[active].double()).to(raw.dtype)
        trial = retract(raw[active], step)
        cost_t, g_t, h_t = evaluate(trial, active)
        old = cost[active]
        better = torch.isfinite(cost_t) & (cost_t < old)
        acc = active[better]
        scale = old if gain_scale is None else gain_scale[active]
        gain = (old[better] - cost_t[better]) / scale[better].abs().clamp_min(tiny)
        raw[acc] = trial[better]
        cost[acc] = cost_t[better]
        grad[acc] = g_t[better]
        hess[acc] = h_t[better]
        lam[acc] = (lam[acc] * 0.3).clamp_min(LAMBDA_MIN)
        rej = active[~better]
        lam[rej] = lam[rej] * 10.0
        done = torch.empty_like(better)
        done[better] = gain < tolerance
        done[~better] = lam[rej] > LAMBDA_MAX
        active = active[~done]
    return raw, cost


def refine_likelihood(problem, y: torch.Tensor, sigma: torch.Tensor, raw0: torch.Tensor,
                      noise_model: str, n_coils: int = 1, free_scale: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fisher scoring on the magnitude likelihood of ``y`` (n, T) from ``raw0`` (n, R), one
    row per voxel; ``sigma`` (n, 1) float64. ``problem`` gives ``signal_jacobian(raw)`` (the
    noise-free signal per group of volumes and its transposed Jacobian in step coordinates),
    ``groups`` (the group of each volume, None = one group per volume) and ``retract``. The
    cost and its derivatives are accumulated in float64.

    ``free_scale`` adds a nuisance amplitude ``s`` (signal ``s phi``, raw ``log s`` from 0): the
    signals were divided by a noisy mean b0, so their scale is known only to within
    sigma / sqrt(n_b0), and the b0 and diffusion-weighted volumes together estimate it. Returns
    the raw vector and ``s`` (n, 1) (None without ``free_scale``)."""
    from ..physics.noise import fisher_information, nll_and_score

    base_retract = problem.retract or _additive_step
    signal_jacobian = problem.signal_jacobian
    retract = problem.retract
    if free_scale:
        raw0 = torch.cat([raw0, torch.zeros_like(raw0[:, :1])], 1)

        def signal_jacobian(raw):
            nu, jac_t = problem.signal_jacobian(raw[:, :-1])
            amp = torch.exp(raw[:, -1:])
            return amp * nu, torch.cat([jac_t * amp.unsqueeze(2), (amp * nu).unsqueeze(1)], 1)

        def retract(raw, step):
            return torch.cat([base_retract(raw[:, :-1], step[:, :-1]),
                              (raw[:, -1:] + step[:, -1:]).clamp(-1.0, 1.0)], 1)

    m = y.double()
    groups = problem.groups
    if groups is not None:
        onehot = torch.zeros(m.shape[1], int(groups.max()) + 1, dtype=torch.float64,
                             device=m.device)
        onehot[torch.arange(m.shape[1], device=m.device), groups] = 1.0
        counts = onehot.sum(0)

    def evaluate(raw, rows):
        nu, jac_t = signal_jacobian(raw)
        nu, jac_t = nu.double(), jac_t.double()
        s, mm = sigma[rows], m[rows]
        nu_v = nu if groups is None else nu[:, groups]
        cost, sc = nll_and_score(mm, nu_v, s, noise_model, n_coils, constants=False)
        cost = cost.sum(1)
        info = fisher_information(nu, s, noise_model, n_coils)
        if groups is not None:
            sc = sc @ onehot
            info = info * counts
        grad = (jac_t @ sc.unsqueeze(2)).squeeze(2)
        hess = (jac_t * info.unsqueeze(1)) @ jac_t.transpose(1, 2)
        return cost, grad.to(raw.dtype), hess.to(raw.dtype)

    # stop when a step gains less than tolerance x (T / 2) nats: the scale of a least-squares
    # cost at its optimum, so the rule matches the relative one of the Gaussian fit
    scale = torch.full((raw0.shape[0],), 0.5 * m.shape[1], dtype=torch.float64, device=m.device)
    raw, _ = damped_newton(evaluate, raw0, max_iter=problem.max_iter,
                           tolerance=problem.tolerance, retract=retract, gain_scale=scale)
    if free_scale:
        return raw[:, :-1], torch.exp(raw[:, -1:].double())
    return raw, None


def cramer_rao_std(model: SignalModel, params: torch.Tensor, sigma: torch.Tensor,
                   noise_model: str, n_coils: int = 1, *, scale: torch.Tensor | None = None,
                   b0: torch.Tensor | None = None) -> torch.Tensor:
    """Per-voxel standard deviation (n, n_params) of the output parameters at ``params``
    (n, n_params), from the Fisher information ``J^T diag(I(nu)) J`` with J the Jacobian of
    ``model.forward`` in the parameters (forward-mode, float64) and I the expected information
    per volume (:func:`~vaemap_bids.physics.noise.fisher_information`); pseudo-inverse, so a
    direction's unidentified length drops out.

    - ``scale`` (n, 1): the fit had a free amplitude (magnitude likelihoods): the signal is
      ``scale * phi`` and the amplitude is a nuisance parameter of the information matrix
      (its uncertainty widens that of the others: the Cramer-Rao bound of the parameters with
      the amplitude unknown).
    - otherwise, with ``b0`` (T,) bool given (gaussian least squares of signals divided by their
      own noisy mean b0, amplitude fixed at 1): the sandwich ``A Cov(y) A^T`` with
      ``A = (J^T J)^-1 J^T`` and, to first order, ``Cov(y) = sigma^2 (I + (phi phi^T - phi b^T
      - b phi^T) / n_b0)`` (b the b0 indicator): the error of the normaliser is common to all
      volumes."""
    from ..physics.noise import fisher_information

    params = params.double()
    cols, value = [], None
    for p in range(params.shape[1]):
        tangent = torch.zeros_like(params)
        tangent[:, p] = 1.0
        with fwAD.dual_level():
            value, dval = fwAD.unpack_dual(model.forward(fwAD.make_dual(params, tangent)))
        cols.append(dval if dval is not None else torch.zeros_like(value))
    jac_t = torch.stack(cols, dim=1)                                   # (n, P, T)
    n_par = params.shape[1]
    if scale is not None:
        scale = scale.double()
        value = value * scale
        jac_t = torch.cat([jac_t * scale.unsqueeze(2), value.unsqueeze(1)], 1)
    info = fisher_information(value, sigma, noise_model, n_coils)     # (n, T)
    fisher = (jac_t * info.unsqueeze(1)) @ jac_t.transpose(1, 2)
    cov = torch.linalg.pinv(fisher, hermitian=True, rtol=1e-12)
    if scale is None and b0 is not None and noise_model == "gaussian" and bool(b0.any()):
        ind = b0.to(dtype=value.dtype, device=value.device)
        n_b0 = float(ind.sum())
        var = (torch.as_tensor(sigma, dtype=value.dtype, device=value.device)
               .reshape(-1, 1) ** 2).expand(value.shape[0], 1)
        amap = cov @ (jac_t * info.unsqueeze(1))                       # (n, P, T): A
        u = amap @ value.unsqueeze(2)                                  # (n, P, 1)
        v = amap @ ind.reshape(1, -1, 1).expand(value.shape[0], -1, 1)
        cov = cov + var.unsqueeze(2) * (u @ u.transpose(1, 2) - u @ v.transpose(1, 2)
                                        - v @ u.transpose(1, 2)) / n_b0
    var = torch.diagonal(cov, dim1=1, dim2=2)[:, :n_par]
    return var.clamp_min(0.0).sqrt()


def _additive_step(raw: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return (raw + step).clamp(-RAW_LIMIT, RAW_LIMIT)


def _normal_equations(r: torch.Tensor, jac_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient J^T r (n, P) and Gauss-Newton curvature J^T J (n, P, P) from J^T (n, P, M)."""
    return (jac_t @ r.unsqueeze(2)).squeeze(2), jac_t @ jac_t.transpose(1, 2)


def _tangent_basis(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors orthogonal to the unit vectors ``n`` (N, 3) and to each other; a
    deterministic function of ``n``, so evaluation and retraction agree on it."""
    axis = torch.zeros_like(n)
    axis.scatter_(1, n.abs().argmin(1, keepdim=True), 1.0)  # the axis least aligned with n
    e1 = torch.linalg.cross(n, axis)
    e1 = e1 / e1.norm(dim=1, keepdim=True)
    return e1, torch.linalg.cross(n, e1)


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _best_of_starts(raw: torch.Tensor, cost: torch.Tensor, n_starts: int) -> torch.Tensor:
    """Rows are laid out start-major (start s of voxel v at s * n + v): keep each voxel's best."""
    n = raw.shape[0] // n_starts
    cost = torch.where(torch.isfinite(cost), cost, torch.full_like(cost, torch.inf))
    best = cost.view(n_starts, n).argmin(0)
    return raw.view(n_starts, n, -1)[best, torch.arange(n, device=raw.device)]


# ---------------------------------------------------------------------------------------------
# MS-DKI: count-weighted least squares on the shell means
# ---------------------------------------------------------------------------------------------
@dataclass
class _ShellReduction:
    """Averaging matrix (T, S), counts (S,) and mean b (S,) of the shells of an acquisition."""

    average: np.ndarray
    counts: np.ndarray
    bvals: np.ndarray

    @classmethod
    def of(cls, acq: Acquisition) -> "_ShellReduction":
        index = acq.shell_index
        n_shells = int(index.max()) + 1
        onehot = np.zeros((acq.n_volumes, n_shells))
        onehot[np.arange(acq.n_volumes), index] = 1.0
        counts = onehot.sum(0)
        return cls(onehot / counts, counts, acq.shell_bvals)


class _MeanSignalProblem:
    """sum_i (y_i - S(b_i))^2 over the volumes equals sum_s n_s (ybar_s - S(b_s))^2 plus a
    constant when S depends on b only (each shell taken at its mean b). Two parameters on a few
    shell means: cheap enough to run in float64. The signal and its Jacobian are written out
    (tests check them against ``MeanSignalDKI.forward`` and finite differences)."""

    def __init__(self, model: MeanSignalDKI, device: torch.device, *, max_iter: int,
                 tolerance: float):
        self.model = model
        self.device = device
        self.max_iter = max_iter
        self.tolerance = tolerance
        red = _ShellReduction.of(model.acquisition)
        self.average = torch.as_tensor(red.average, dtype=torch.float32, device=device)
        self.sqrt_counts = torch.as_tensor(np.sqrt(red.counts), dtype=torch.float64, device=device)
        self.counts = torch.as_tensor(red.counts, dtype=torch.float64, device=device)
        self.bvals = torch.as_tensor(red.bvals, dtype=torch.float64, device=device)
        #: the shell of each volume: the likelihood is per volume, the signal per shell
        self.groups = torch.as_tensor(model.acquisition.shell_index, dtype=torch.long,
                                      device=device)

    def initial_raw(self, ybar: torch.Tensor) -> torch.Tensor:
        """Closed-form weighted log-linear fit with S0 = 1: log ybar = -b D + b^2 (D^2 K / 6),
        weights n_s ybar_s^2 (the usual WLS weights of a log transform), moved into bounds."""
        b = self.bvals
        logy = torch.log(ybar.clamp_min(1e-4))
        w = self.counts * ybar.clamp_min(1e-4).square()
        x1, x2 = -b, b * b
        a11 = (w * x1 * x1).sum(1)
        a12 = (w * x1 * x2).sum(1)
        a22 = (w * x2 * x2).sum(1)
        r1 = (w * x1 * logy).sum(1)
        r2 = (w * x2 * logy).sum(1)
        det = (a11 * a22 - a12 * a12).clamp_min(1e-300)
        d = (a22 * r1 - a12 * r2) / det
        c = (a11 * r2 - a12 * r1) / det
        spec = self.model.parameters[0]
        d = d.clamp(spec.lo + 1e-3 * (spec.hi - spec.lo), spec.hi - 1e-3 * (spec.hi - spec.lo))
        k_max = self.model.k_max(d)
        k = (6.0 * c / (d * d)).clamp(1e-3 * k_max, 0.999 * k_max)
        raw = self.model.unsquash(torch.stack([d, k], 1).cpu().numpy())
        return torch.as_tensor(raw, dtype=torch.float64, device=self.device)

    retract = None

    def evaluate(self, raw: torch.Tensor, ybar: torch.Tensor):
        """Count-weighted residuals on the shell means and their analytic Jacobian; the
        parameters come from the model's own squash, K bounded by k_max(D) as there."""
        signal, jac_t = self.signal_jacobian(raw)
        w = self.sqrt_counts
        return (signal - ybar) * w, jac_t * w

    def signal_jacobian(self, raw: torch.Tensor):
        """Signal at each shell's mean b (n, S) and its transposed Jacobian in raw (n, 2, S)."""
        model = self.model
        params = model.squash(raw)
        d, k = params[:, 0:1], params[:, 1:2]
        spec = model.parameters[0]
        sd = torch.sigmoid(raw[:, 0:1])
        sk = torch.sigmoid(raw[:, 1:2])
        dd_du = (spec.hi - spec.lo) * sd * (1 - sd)
        k_max = model.k_max(d)
        # k_max = min(K_hi, c / D): it moves with D only where the validity edge is the limit
        edge = 3.0 * VALIDITY_MARGIN / (model.b_max_used * d.clamp_min(1e-6))
        dkmax_dd = torch.where(edge < model.parameters[1].hi, -edge / d.clamp_min(1e-6),
                               torch.zeros_like(d))
        b = self.bvals[None, :]
        signal = torch.exp(-b * d + (b * d).square() * k / 6.0)
        ds_dd = signal * (-b + b * b * d * k / 3.0)
        ds_dk = signal * (b * d).square() / 6.0
        jac_t = torch.stack([ds_dd * dd_du + ds_dk * sk * dkmax_dd * dd_du,
                             ds_dk * k_max * sk * (1 - sk)], dim=1)
        return signal, jac_t

    def solve_raw(self, y: torch.Tensor) -> torch.Tensor:
        """The least-squares raw vector (n, 2), float64."""
        ybar = (y.float() @ self.average).double()

        def evaluate(raw, rows):
            return self.evaluate(raw, ybar[rows])

        raw, _ = levenberg_marquardt(evaluate, self.initial_raw(ybar), max_iter=self.max_iter,
                                     tolerance=self.tolerance)
        return raw

    def solve(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.squash(self.solve_raw(y)).float()


def _jvp_evaluator(signal: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                   weights: torch.Tensor | None = None,
                   voxel_of_row: torch.Tensor | None = None) -> Evaluator:
    """Residuals and transposed Jacobian of any differentiable ``signal(raw)`` whose rows are
    independent: one forward-mode (dual number) pass per raw column."""

    def evaluate(raw, rows):
        vox = rows if voxel_of_row is None else voxel_of_row[rows]
        cols = []
        value = None
        for p in range(raw.shape[1]):
            tangent = torch.zeros_like(raw)
            tangent[:, p] = 1.0
            with fwAD.dual_level():
                value, dval = fwAD.unpack_dual(signal(fwAD.make_dual(raw, tangent)))
            cols.append(dval if dval is not None else torch.zeros_like(value))
        r = value - targets[vox].to(value.dtype)
        jac_t = torch.stack(cols, dim=1)
        if weights is not None:
            r = r * weights
            jac_t = jac_t * weights
        return r, jac_t

    return evaluate


# ---------------------------------------------------------------------------------------------
# Ball-stick: analytic Jacobian, DTI direction, (Dpar, Diso) grid with the best f in closed form
# ---------------------------------------------------------------------------------------------
class _BallStickProblem:
    def __init__(self, model: BallStick, device: torch.device, dtype: torch.dtype, *,
                 n_starts: int, grid_dpar, grid_diso, max_iter: int, tolerance: float):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.n_starts = int(n_starts)
        self.max_iter = max_iter
        self.tolerance = tolerance
        acq = model.acquisition
        self.b, self.g = model.tensors(device, dtype)
        specs = {p.label: p for p in model.parameters}
        self.lo = torch.tensor([specs[k].lo for k in ("stickfrac", "dpar", "diso")], dtype=dtype,
                               device=device)
        self.span = torch.tensor([specs[k].hi - specs[k].lo for k in ("stickfrac", "dpar", "diso")],
                                 dtype=dtype, device=device)
        self.grid_dpar = self._inside(grid_dpar, specs["dpar"])
        self.grid_diso = self._inside(grid_diso, specs["diso"])
        # DTI design for the start direction: log S = log S0 - b g^T D g, ordinary least squares
        bv, gv = acq.bvals, acq.bvecs
        design = np.stack([np.ones_like(bv), -bv * gv[:, 0] ** 2, -bv * gv[:, 1] ** 2,
                           -bv * gv[:, 2] ** 2, -2 * bv * gv[:, 0] * gv[:, 1],
                           -2 * bv * gv[:, 0] * gv[:, 2], -2 * bv * gv[:, 1] * gv[:, 2]], 1)
        self.dti_pinv = torch.as_tensor(np.linalg.pinv(design).T, dtype=dtype, device=device)

    def _inside(self, values, spec) -> torch.Tensor:
        """Grid values moved strictly inside the bounds, so that their raw values are finite."""
        margin = 0.01 * (spec.hi - spec.lo)
        values = np.clip(np.asarray(values, dtype=float), spec.lo + margin, spec.hi - margin)
        return torch.as_tensor(values, dtype=self.dtype, device=self.device)

    # -- forward model and its Jacobian, written out ----------------------------------------
    # raw = (logit f, logit Dpar, logit Diso, unit n). A step moves the three scalars and n in
    # its tangent plane (two coordinates), which removes the null direction of |n|.
    def evaluate(self, raw: torch.Tensor, targets: torch.Tensor):
        b = self.b
        s = torch.sigmoid(raw[:, :3])
        scal = self.lo + self.span * s
        dscal = self.span * s * (1 - s)           # d(param)/d(raw) of f, Dpar, Diso
        f, dpar, diso = scal[:, 0:1], scal[:, 1:2], scal[:, 2:3]
        n = raw[:, 3:6]
        e1, e2 = _tangent_basis(n)
        proj = torch.stack([n, e1, e2], 1) @ self.g.T     # (N, 3, T): g.n, g.e1, g.e2
        cos = proj[:, 0]
        bcos2 = b * cos * cos
        stick = torch.exp(bcos2 * -dpar)
        ball = torch.exp(b * -diso)
        diff = stick - ball
        r = torch.addcmul(ball, diff, f) - targets
        fstick = stick * f
        jac_t = torch.empty(raw.shape[0], 5, b.numel(), dtype=raw.dtype, device=raw.device)
        torch.mul(diff, dscal[:, 0:1], out=jac_t[:, 0])
        torch.mul(fstick * bcos2, -dscal[:, 1:2], out=jac_t[:, 1])
        torch.mul(ball * b, -(1 - f) * dscal[:, 2:3], out=jac_t[:, 2])
        # dS/dn = -2 b Dpar (g.n) f stick g; along the tangent e_k it is that times g.e_k
        coef = (fstick * cos) * (b * (-2.0 * dpar))
        torch.mul(proj[:, 1:], coef.unsqueeze(1), out=jac_t[:, 3:])
        return r, jac_t

    @staticmethod
    def retract(raw: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        n = raw[:, 3:6]
        e1, e2 = _tangent_basis(n)
        moved = n + step[:, 3:4] * e1 + step[:, 4:5] * e2
        return torch.cat([(raw[:, :3] + step[:, :3]).clamp(-RAW_LIMIT, RAW_LIMIT),
                          _unit_rows(moved)], 1)

    def principal_direction(self, y: torch.Tensor) -> torch.Tensor:
        coef = torch.log(y.clamp_min(1e-3)) @ self.dti_pinv
        dxx, dyy, dzz, dxy, dxz, dyz = coef[:, 1:].unbind(1)
        tensor = torch.stack([torch.stack([dxx, dxy, dxz], 1), torch.stack([dxy, dyy, dyz], 1),
                              torch.stack([dxz, dyz, dzz], 1)], 1)
        _, vecs = torch.linalg.eigh(tensor.double() if tensor.device.type == "cpu" else tensor)
        return vecs[:, :, 2].to(y.dtype)

    def grid_starts(self, y: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The ``n_starts`` best grid points of every voxel as raw vectors, start-major.

        For fixed (Dpar, Diso, n) the signal is linear in f: S = B + f (A - B), so the best f
        is <y - B, A - B> / |A - B|^2 (kept inside the bounds) and each grid point costs a few
        inner products."""
        b = self.b
        cos2 = (n @ self.g.T).square()
        ball = torch.exp(-self.grid_diso[:, None] * b[None, :])          # (Ni, T)
        yy = y.square().sum(1, keepdim=True)
        yb = y @ ball.T                                                  # (N, Ni)
        bb = ball.square().sum(1)[None, :]                               # (1, Ni)
        costs, fracs = [], []
        f_lo = float(self.lo[0] + 0.02 * self.span[0])
        f_hi = float(self.lo[0] + 0.98 * self.span[0])
        for dpar in self.grid_dpar:
            stick = torch.exp(-dpar * b * cos2)                          # (N, T)
            ya = (y * stick).sum(1, keepdim=True)
            aa = stick.square().sum(1, keepdim=True)
            ab = stick @ ball.T                                          # (N, Ni)
            dd = (aa - 2 * ab + bb).clamp_min(1e-12)                     # |A - B|^2
            rd = ya - yb - ab + bb                                       # <y - B, A - B>
            f = (rd / dd).clamp(f_lo, f_hi)
            # |y - B - f (A - B)|^2
            costs.append(yy - 2 * yb + bb - 2 * f * rd + f * f * dd)
            fracs.append(f)
        cost = torch.stack(costs, 1).reshape(y.shape[0], -1)             # (N, Np * Ni)
        frac = torch.stack(fracs, 1).reshape(y.shape[0], -1)
        k = min(self.n_starts, cost.shape[1])
        best = cost.topk(k, dim=1, largest=False).indices                 # (N, k)
        if k < self.n_starts:  # fewer grid points than starts: repeat the best
            best = torch.cat([best, best[:, :1].expand(-1, self.n_starts - k)], 1)
        n_iso = self.grid_diso.numel()
        starts = []
        for s in range(self.n_starts):
            idx = best[:, s]
            scal = torch.stack([frac.gather(1, idx[:, None])[:, 0], self.grid_dpar[idx // n_iso],
                                self.grid_diso[idx % n_iso]], 1)
            u = ((scal - self.lo) / self.span).clamp(1e-6, 1 - 1e-6)
            starts.append(torch.cat([torch.logit(u), n], 1))
        return torch.cat(starts, 0)

    groups = None

    def signal_jacobian(self, raw: torch.Tensor):
        """Signal (n, T) and its transposed Jacobian in step coordinates (n, 5, T)."""
        return self.evaluate(raw, 0.0)

    def solve(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.squash(self.solve_raw(y)).float()

    def solve_raw(self, y: torch.Tensor) -> torch.Tensor:
        """The least-squares raw vector of the best start (n, 6)."""
        y = y.to(self.dtype)
        n_vox = y.shape[0]
        raw0 = self.grid_starts(y, self.principal_direction(y))
        voxel_of_row = torch.arange(n_vox, device=y.device).repeat(self.n_starts)

        def evaluate(raw, rows):
            return self.evaluate(raw, y[voxel_of_row[rows]])

        raw, cost = levenberg_marquardt(evaluate, raw0, max_iter=self.max_iter,
                                        tolerance=self.tolerance, retract=self.retract)
        return _best_of_starts(raw, cost, self.n_starts)


# ---------------------------------------------------------------------------------------------
# Any other model: automatic Jacobian, middle of the bounds plus seeded random starts
# ---------------------------------------------------------------------------------------------
class _GenericProblem:
    def __init__(self, model: SignalModel, device: torch.device, dtype: torch.dtype, *,
                 n_starts: int, seed: int, max_iter: int, tolerance: float):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.n_starts = int(n_starts)
        self.seed = int(seed)
        self.max_iter = max_iter
        self.tolerance = tolerance
        self.direction_cols = [sl for p, sl in zip(model.parameters, model.param_slices().values())
                               if p.is_direction]

    def starts(self, n_vox: int) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        raw = [torch.zeros(n_vox, self.model.n_raw, dtype=self.dtype)]
        for _ in range(self.n_starts - 1):
            raw.append(1.5 * torch.randn(n_vox, self.model.n_raw, generator=gen, dtype=self.dtype))
        raw = torch.cat(raw, 0)
        for sl in self.direction_cols:  # a zero direction has no gradient: start from random ones
            raw[:, sl] = _unit_rows(torch.randn(raw.shape[0], 3, generator=gen, dtype=self.dtype))
        return raw.to(self.device)

    def retract(self, raw: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Additive step; a direction block is given unit length again (the model normalises it
        anyway, so only the scale of the next step changes)."""
        out = (raw + step).clamp(-RAW_LIMIT, RAW_LIMIT)
        for sl in self.direction_cols:
            out[:, sl] = _unit_rows(raw[:, sl] + step[:, sl])
        return out

    groups = None

    def signal_jacobian(self, raw: torch.Tensor):
        """Signal (n, T) and its transposed Jacobian in raw (n, R, T), forward mode."""
        model = self.model
        evaluate = _jvp_evaluator(lambda r: model.forward(model.squash(r)),
                                  torch.zeros(1, 1, dtype=raw.dtype, device=raw.device),
                                  voxel_of_row=torch.zeros(raw.shape[0], dtype=torch.long,
                                                           device=raw.device))
        return evaluate(raw, torch.arange(raw.shape[0], device=raw.device))

    def solve(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.squash(self.solve_raw(y)).float()

    def solve_raw(self, y: torch.Tensor) -> torch.Tensor:
        """The least-squares raw vector of the best start (n, R)."""
        y = y.to(self.dtype)
        model = self.model
        voxel_of_row = torch.arange(y.shape[0], device=y.device).repeat(self.n_starts)
        evaluate = _jvp_evaluator(lambda raw: model.forward(model.squash(raw)), y,
                                  voxel_of_row=voxel_of_row)
        raw, cost = levenberg_marquardt(evaluate, self.starts(y.shape[0]), max_iter=self.max_iter,
                                        tolerance=self.tolerance, retract=self.retract)
        return _best_of_starts(raw, cost, self.n_starts)
