"""The paper's three-cluster MS-DKI simulation (Fig. 1), made physical (SCIENCE.md section 5).

Three Gaussian clusters of (D, K) mimic white matter, grey matter and CSF. Each voxel's cluster
is drawn first, with the mixing weights; its (D, K) is then drawn from that cluster's Gaussian
and redrawn until it is physical (D > 0, K >= 0, b_max D K < 3 at the largest b used) and inside
the model's parameter bounds. The cluster proportions therefore follow the weights exactly in
expectation, while each cluster's distribution is its Gaussian truncated to the physical domain:
the effective means and standard deviations, and how many draws were rejected, are recorded in
:class:`Simulation.rejection`. The stored truth is exactly the array that made the signal.

The clean signal covers every volume the model uses (for MS-DKI on the HCP table: 18 b0 and the
90 directions of b = 1 and 2 ms/um^2); the b0 volumes get Rician noise like the others and the
noisy signal is divided by its own noisy mean b0, exactly what real data give.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..physics.acquisition import Acquisition
from ..physics.base import SignalModel, make_model
from .noise import add_rician_noise, rician_sigma

#: The paper's clusters: names, means of (D [um^2/ms], K), per-parameter variance, weights.
PAPER_CLUSTERS = {
    "names": ("WM-like", "GM-like", "CSF-like"),
    "means": ((1.0, 1.5), (1.5, 1.0), (3.0, 0.0)),
    "variances": (0.1, 0.1, 0.01),
    "weights": (0.5, 0.4, 0.1),
}
#: Give up when a cluster accepts fewer than this fraction of its draws (a spec far outside the
#: physical domain would otherwise loop for a very long time).
MIN_ACCEPTANCE = 1e-3


@dataclass
class Simulation:
    """One simulated data set. Arrays have one row per voxel.

    ``params``: truth (N, 2) in vaemap units (D in um^2/ms, K); ``labels``: cluster index (N,);
    ``clean``: noiseless S/S0 (N, T) of ``model.acquisition``; ``noisy``: the measured signal
    (N, T), b0-normalised by its own noisy mean b0 unless ``renormalised`` is False (then it is
    the noisy magnitude with the true S0 = 1).
    """

    model: SignalModel
    params: np.ndarray
    labels: np.ndarray
    clean: np.ndarray
    noisy: np.ndarray
    snr: float
    sigma: float
    seed: int
    renormalised: bool
    cluster_names: tuple[str, ...]
    cluster_means: np.ndarray
    cluster_variances: np.ndarray
    cluster_weights: np.ndarray
    b_max: float
    rejection: list[dict] = field(default_factory=list)
    #: the noisy mean b0 each row was divided by (None when not renormalised): the noise of the
    #: normalised signal of a voxel is sigma / b0_mean
    b0_mean: np.ndarray | None = None

    @property
    def acquisition(self) -> Acquisition:
        return self.model.acquisition

    @property
    def n_voxels(self) -> int:
        return int(self.params.shape[0])

    def summary(self) -> dict:
        """Everything but the arrays, JSON-ready."""
        return {
            "model": self.model.name,
            "n_voxels": self.n_voxels,
            "n_volumes": int(self.clean.shape[1]),
            "shells_smm2": [row["bval_smm2"] for row in self.acquisition.shell_table()],
            "b_max_used_smm2": float(self.b_max * 1e3),
            "snr": float(self.snr),
            "sigma": float(self.sigma),
            "seed": int(self.seed),
            "renormalised_by_noisy_b0": bool(self.renormalised),
            "clusters": [
                {"name": name, "mean": [float(v) for v in mean], "variance": float(var),
                 "weight": float(w)}
                for name, mean, var, w in zip(self.cluster_names, self.cluster_means,
                                              self.cluster_variances, self.cluster_weights)],
            "rejection": self.rejection,
        }


def _physical(model: SignalModel, params: np.ndarray) -> np.ndarray:
    """Physical (the model's validity domain) and inside the model's parameter bounds."""
    lo, hi = model.bounds()
    inside = np.all((params >= lo) & (params <= hi), axis=1)  # D > 0 strictly: invalid_mask
    return inside & ~model.invalid_mask(params)


def draw_truth(model: SignalModel, labels: np.ndarray, means, variances, rng: np.random.Generator,
               names=None) -> tuple[np.ndarray, list[dict]]:
    """(D, K) for every voxel of each cluster, by rejection from that cluster's Gaussian.

    Returns the truth (N, 2) and, per cluster, the number of draws, of rejections, the acceptance
    rate and the effective (truncated) mean and standard deviation of what was kept.
    """
    means = np.asarray(means, dtype=np.float64)
    variances = np.asarray(variances, dtype=np.float64)
    params = np.empty((labels.size, means.shape[1]), dtype=np.float64)
    stats = []
    for c, (mean, var) in enumerate(zip(means, variances)):
        idx = np.flatnonzero(labels == c)
        sd = np.sqrt(var) * np.ones_like(mean)
        kept, n_draws, need = [], 0, idx.size
        while need > 0:
            cand = mean + sd * rng.standard_normal((max(64, int(need * 1.5)), mean.size))
            ok = _physical(model, cand)
            accepted = np.flatnonzero(ok)
            if accepted.size >= need:  # count only the draws up to the last one kept
                n_draws += int(accepted[need - 1]) + 1
                kept.append(cand[accepted[:need]])
                need = 0
            else:
                n_draws += len(cand)
                kept.append(cand[accepted])
                need -= accepted.size
            n_acc = idx.size - need
            if need and n_draws >= 10_000 and n_acc < MIN_ACCEPTANCE * n_draws:
                raise ValueError(
                    f"cluster {c} (mean {mean.tolist()}, variance {var}) is almost never physical "
                    f"for {model.name} at b_max = {model.b_max_used * 1e3:.0f} s/mm^2 "
                    f"({n_acc} of {n_draws} draws accepted)")
        values = np.concatenate(kept) if kept else np.empty((0, mean.size))
        params[idx] = values
        n_used_draws, n_rejected = n_draws, n_draws - idx.size
        stats.append({
            "cluster": int(c),
            "name": None if names is None else str(names[c]),
            "n_voxels": int(idx.size),
            "n_draws": int(n_used_draws),
            "n_rejected": int(n_rejected),
            "acceptance_rate": float(idx.size / n_used_draws) if n_used_draws else float("nan"),
            "nominal_mean": mean.tolist(),
            "effective_mean": values.mean(axis=0).tolist() if idx.size else [float("nan")] * mean.size,
            "nominal_sd": sd.tolist(),
            "effective_sd": values.std(axis=0).tolist() if idx.size else [float("nan")] * mean.size,
        })
    return params, stats


def simulate_clusters(acquisition: Acquisition, n_voxels: int = 10_000, snr: float = 20.0,
                      seed: int = 0, *, means=None, variances=None, weights=None, names=None,
                      model: str | SignalModel = "msdki", renormalise: bool = True) -> Simulation:
    """Simulate ``n_voxels`` MS-DKI voxels of the paper's three clusters with Rician noise.

    ``acquisition`` is the full acquisition (e.g. :func:`hcp_acquisition`); the model keeps the
    volumes it uses (MS-DKI: b <= 2.5 ms/um^2). ``means``/``variances``/``weights``/``names``
    default to :data:`PAPER_CLUSTERS` (variance is per parameter, the covariance is diagonal).
    ``renormalise=False`` skips the division by the noisy mean b0 (the noisy magnitude with the
    true S0 = 1): only useful to separate the effect of b0 noise from that of the fit.

    The same ``seed`` gives the same truth at every SNR, and noise that is the same draw scaled
    by 1/SNR, so that SNRs are compared on identical voxels.
    """
    if int(n_voxels) < 1:
        raise ValueError(f"n_voxels must be at least 1, got {n_voxels}")
    sigma = rician_sigma(snr)
    sig_model = make_model(model, acquisition) if isinstance(model, str) else model
    if sig_model.n_params != 2:
        raise ValueError(f"the cluster simulation needs a two-parameter (D, K) model, "
                         f"{sig_model.name} has {sig_model.n_params}")
    means = np.asarray(PAPER_CLUSTERS["means"] if means is None else means, dtype=np.float64)
    variances = np.asarray(PAPER_CLUSTERS["variances"] if variances is None else variances,
                           dtype=np.float64)
    weights = np.asarray(PAPER_CLUSTERS["weights"] if weights is None else weights, dtype=np.float64)
    names = tuple(PAPER_CLUSTERS["names"] if names is None and len(means) == 3
                  else names or [f"cluster{c}" for c in range(len(means))])
    if means.ndim != 2 or means.shape[1] != 2:
        raise ValueError(f"cluster means must have shape (n_clusters, 2), got {means.shape}")
    if not (variances.shape == weights.shape == (len(means),) and len(names) == len(means)):
        raise ValueError("means, variances, weights and names must have one entry per cluster")
    if np.any(variances < 0) or np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
        raise ValueError("variances must be >= 0 and weights >= 0 summing to 1")

    truth_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    labels = truth_rng.choice(len(means), size=int(n_voxels), p=weights)
    params, stats = draw_truth(sig_model, labels, means, variances, truth_rng, names)
    clean = sig_model.forward_numpy(params)
    noisy = add_rician_noise(clean, snr, noise_rng)
    if renormalise:
        b0 = sig_model.acquisition.b0_mask
        if not b0.any():
            raise ValueError("the model's volumes include no b0 to normalise by")
        b0_mean = noisy[:, b0].mean(axis=1)
        noisy = noisy / b0_mean[:, None]
    else:
        b0_mean = None
    return Simulation(
        model=sig_model, params=params, labels=labels.astype(np.int64), clean=clean, noisy=noisy,
        snr=float(snr), sigma=sigma, seed=int(seed), renormalised=bool(renormalise),
        cluster_names=names, cluster_means=means, cluster_variances=variances,
        cluster_weights=weights, b_max=float(sig_model.acquisition.bvals.max()), rejection=stats,
        b0_mean=b0_mean)
