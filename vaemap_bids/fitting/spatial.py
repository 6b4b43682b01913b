"""``svae``: a spatial VAE with a mixture prior that borrows from each voxel's neighbours of the
same tissue, and only from those.

Why the prior and not just the encoder. With a prior that is the same for every voxel, the best
posterior of a voxel depends on its own signal only, whatever the encoder sees, so an encoder
that reads a neighbourhood cannot beat the voxelwise limit (SCIENCE.md 7). The information the
neighbours hold enters here through a *conditional* prior: voxel i's latent z_i, given that it
belongs to component k, is a priori close to what its neighbours of component k are.

Generative model of voxel i (rows of the mask, voxel indices ``voxel_coords``):

- latent ``z_i = (u_i, l_i)``: ``u_i`` the model's unconstrained parameters (the decoder is the
  model's own squashing, ``params = model.squash(u)``: no free decoder weights), ``l_i`` the log
  of the voxel's S0 (relative to the median mean b0 of the series);
- signal: ``R_i,t ~ Rice(exp(l_i) phi_t(params_i), sigma)`` with ``R_i = y_i * s0_i / c`` the
  measured magnitude (``y`` b0-normalised, ``s0`` each voxel's mean b0, ``c`` their median) and
  one global noise sd ``sigma`` (learnt, the maximum-likelihood value of the ELBO, or given);
  the Rician likelihood is :func:`vaemap_bids.physics.noise.negative_log_likelihood`;
- component: ``p(y_i = k) = pi_ik = (1 - lam) / K + lam * mean_{j in N(i)} q(y_j = k)`` over the
  neighbours j of i inside the mask (a mean-field Potts prior; ``lam`` learnt);
- ``p(z_i | y_i = k) = N(m_ik, diag s_k^2)`` with the local mean
  ``m_ik = (sum_j q_jk mu_jk + kappa M_k) / (sum_j q_jk + kappa)``: the neighbours' posterior
  means of component k, weighted by how much each neighbour belongs to k, shrunk to the global
  component mean ``M_k`` by a pseudo-count ``kappa`` (empirical Bayes: ``M_k``, ``s_k`` learnt).
  So S0 is regularised like every parameter (spatially smooth within a tissue), neighbours of
  another tissue (low ``q_jk``) lend nothing, so nothing is smeared across a boundary, and how
  much a voxel borrows is decided by the learnt ``s_k``: a component whose neighbours do not
  predict each other gets a wide prior. Background and excluded voxels are never neighbours.
  Fibre directions (n and -n are one fibre) are sign-aligned to the voxel's own before they
  are averaged.

Inference: an encoder (an MLP over the voxel's own signal, its log mean b0, the neighbours'
mean responsibilities and how many neighbours it has) gives ``q(y_i)``, and a head per component
takes the encoder features together with the local prior ``(m_ik, s_k)`` and gives
``q(z_i | y_i = k) = N(m_ik + d_ik, diag v_ik)`` (for log S0 the voxel's own log mean b0 takes
the place of ``m_ik``): it sees the neighbourhood through its
summaries. The neighbours' ``mu_jk`` and ``q_jk`` come from a memory of the latest encoder
outputs of every voxel (detached, refreshed every step for the batch and every epoch for the
held-out voxels). Components are enumerated (no Gumbel sampling): the loss is the exact
negative ELBO ``sum_k q_ik [NLL_ik + beta KL(q(z|k) || p(z|k))] + beta KL(q(y) || pi)``, with
beta 0 during a warm-up, then ramped to 1 (a proper ELBO, so the posterior sd means what it
says). At the end of the warm-up the component means are initialised by k-means of the latent
means.

Outputs, as vaegmm: maps are posterior means (the expectation over q(y) of the mean over
``n_posterior_samples`` draws of z per component; directions at the most probable component),
``std`` the posterior sd of that mixture, ``responsibilities`` q(y), ``latent_mean`` the mean of
z at the most probable component. Before the maps are read, the memory is refreshed over all
voxels ``refresh_passes`` times so that every prior uses the final encoder.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..physics.base import SignalModel
from ..physics.noise import negative_log_likelihood
from .base import FitResult, scatter_rows
from .networks import LOGVAR_RANGE, gaussian_kl, mlp
from .options import method_options
from .train import (EarlyStopping, _matmul_precision, _split,
                    check_options as check_network_options, resolve_batch_size, schedule_length)

log = logging.getLogger("vaemap.fitting.spatial")

CONNECTIVITIES = (6, 18, 26)


# ---- options ---------------------------------------------------------------------------------
def check_options(opts: dict) -> None:
    """Range checks of svae's options (the shared network options by the trainer's checks)."""
    check_network_options("svae", {k: v for k, v in opts.items() if k != "beta"})

    def need(key, ok, what):
        if key in opts and not ok(opts[key]):
            raise ValueError(f"svae: option {key}={opts[key]!r} must be {what}")

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need("connectivity", lambda v: v in CONNECTIVITIES, f"one of {list(CONNECTIVITIES)}")
    need("prior_pseudocount", lambda v: is_num(v) and v > 0, "a number > 0")
    need("sigma", lambda v: v == "auto" or (is_num(v) and v > 0), "'auto' or a number > 0")
    need("refresh_passes", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
         "an integer >= 1")
    need("beta", lambda v: is_num(v) and v >= 0, "a number >= 0 (1 = the ELBO)")
    need("refine_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
         "an integer >= 0")
    need("refine_lr", lambda v: is_num(v) and v > 0, "a number > 0")
    need("prior_dof", lambda v: is_num(v) and v > 0, "a number > 0")
    need("refine_start", lambda v: v in ("lsq", "encoder"), "'lsq' or 'encoder'")


# ---- neighbourhoods --------------------------------------------------------------------------
def neighbour_offsets(connectivity: int = 26) -> np.ndarray:
    """(n, 3) voxel offsets of a 6-, 18- or 26-neighbourhood."""
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {list(CONNECTIVITIES)}, got {connectivity}")
    grid = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    l1 = np.abs(grid).sum(axis=1)
    keep = (l1 > 0) & (l1 <= {6: 1, 18: 2, 26: 3}[connectivity])
    return grid[keep]


def neighbour_index(voxel_coords: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """(N, n) row index of each row's neighbours among the rows, -1 where the neighbour is not a
    row (background, or a voxel that was excluded)."""
    coords = np.asarray(voxel_coords)
    if coords.ndim != 2 or coords.shape[1] != 3 or not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"voxel_coords must be (N, 3) integer voxel indices, got "
                         f"{coords.shape} {coords.dtype}")
    coords = coords.astype(np.int64)
    lo = coords.min(axis=0)
    shifted = coords - lo + 1
    volume = np.full(tuple(shifted.max(axis=0) + 2), -1, dtype=np.int64)
    if np.any(volume[tuple(shifted.T)] != -1):
        raise ValueError("voxel_coords has a voxel twice")
    volume[tuple(shifted.T)] = np.arange(len(coords))
    if len(np.unique(volume[volume >= 0])) != len(coords):
        raise ValueError("voxel_coords has a voxel twice")
    offsets = neighbour_offsets(connectivity)
    return np.stack([volume[tuple((shifted + off).T)] for off in offsets], axis=1)


# ---- the network -----------------------------------------------------------------------------
class SpatialVAE(nn.Module):
    """Encoder, learnt prior and memory of svae (see the module docstring)."""

    method = "svae"

    def __init__(self, model: SignalModel, n_voxels: int, n_neighbours: int, *,
                 hidden_width: int, n_hidden: int, activation: str, n_components: int,
                 pseudocount: float, sigma_init: float, learn_sigma: bool,
                 prior_dof: float = 4.0):
        super().__init__()
        self.signal_model = model
        self.n_raw = model.n_raw
        self.latent_dim = model.n_raw + 1           # parameters and log S0
        self.n_components = k = int(n_components)
        self.n_neighbours = int(n_neighbours)
        self.pseudocount = float(pseudocount)
        self.prior_dof = float(prior_dof)
        lat = self.latent_dim
        t = model.n_measurements
        self.trunk = mlp(t + 2 + k, hidden_width, n_hidden, None, activation)
        self.head_y = nn.Linear(hidden_width, k)
        self.head_z = nn.Linear(hidden_width + k + 2 * lat, 2 * lat)
        with torch.no_grad():
            self.head_z.weight.mul_(0.1)
            self.head_z.bias[lat:].fill_(-6.0)      # start near a deterministic autoencoder
        # set by closed-form M-steps (variational EM), not by gradients
        self.register_buffer("prior_mean", torch.zeros(k, lat))
        self.register_buffer("prior_logvar", torch.zeros(k, lat))
        self.mix_logit = nn.Parameter(torch.zeros(()))
        # edge-aware borrowing: a neighbour's weight falls with its distance to the voxel in the
        # latent space, on a learnt scale per latent dimension (set at the end of the warm-up)
        self.log_bandwidth = nn.Parameter(torch.zeros(lat))
        log_sigma = torch.tensor(math.log(sigma_init))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        self.register_buffer("memory_mu", torch.zeros(n_voxels, k, lat))
        self.register_buffer("memory_q", torch.full((n_voxels, k), 1.0 / k))
        self.dir_slices = [sl for p, sl in zip(model.parameters, model.param_slices().values())
                           if p.is_direction]

    # ---- priors --------------------------------------------------------------------------
    def neighbour_priors(self, rows: torch.Tensor, nbr: torch.Tensor) -> dict:
        """pi (B, K), local prior means (B, K, L) and the neighbour features of ``rows``."""
        ok = nbr >= 0
        safe = nbr.clamp_min(0)
        okf = ok.to(self.memory_q.dtype)
        q_nb = self.memory_q[safe] * okf[..., None]                   # (B, n, K)
        count = okf.sum(dim=1)                                        # (B,)
        k = self.n_components
        mean_q = torch.where(count[:, None] > 0, q_nb.sum(dim=1) / count.clamp_min(1)[:, None],
                             torch.full_like(q_nb[:, 0], 1.0 / k))
        lam = torch.sigmoid(self.mix_logit)
        pi = (1 - lam) / k + lam * mean_q
        mu_nb = self.memory_mu[safe]                                  # (B, n, K, L)
        if self.dir_slices:
            own = self.memory_mu[rows]                                # (B, K, L)
            mu_nb = mu_nb.clone()
            for sl in self.dir_slices:
                dot = (mu_nb[..., sl] * own[:, None, :, sl]).sum(dim=-1, keepdim=True)
                mu_nb[..., sl] = torch.where(dot < 0, -mu_nb[..., sl], mu_nb[..., sl])
        own = self.memory_mu[rows]                                    # (B, K, L)
        d2 = (((mu_nb - own[:, None]) * torch.exp(-self.log_bandwidth)) ** 2).sum(dim=3)
        w = q_nb * torch.exp(-0.5 * d2)                               # (B, n, K)
        weight_sum = w.sum(dim=1)                                     # (B, K)
        local = ((w[..., None] * mu_nb).sum(dim=1) + self.pseudocount * self.prior_mean) \
            / (weight_sum + self.pseudocount)[..., None]
        return {"pi": pi, "mean_q": mean_q, "count": count / max(1, self.n_neighbours),
                "prior_mu": local, "borrowed": weight_sum}

    def prior_logvars(self) -> torch.Tensor:
        return self.prior_logvar.clamp(*LOGVAR_RANGE)

    # ---- encoder -------------------------------------------------------------------------
    def encode(self, y, log_s0, rows, nbr) -> dict:
        pri = self.neighbour_priors(rows, nbr)
        x = torch.cat([y, log_s0[:, None], pri["mean_q"], pri["count"][:, None]], dim=1)
        h = self.trunk(x)
        logits = self.head_y(h)
        b, k, lat = y.shape[0], self.n_components, self.latent_dim
        prior_lv = self.prior_logvars().expand(b, k, lat)
        eye = torch.eye(k, device=y.device, dtype=h.dtype).expand(b, k, k)
        inp = torch.cat([h[:, None].expand(b, k, h.shape[1]), eye, pri["prior_mu"], prior_lv],
                        dim=2)
        delta, logvar = self.head_z(inp).chunk(2, dim=2)
        # parameters: a correction of the local prior mean; log S0: of the voxel's own mean b0
        mu = torch.cat([pri["prior_mu"][..., :-1] + delta[..., :-1],
                        log_s0[:, None, None] + delta[..., -1:]], dim=2)
        return {"logits": logits, "mu": mu, "logvar": logvar.clamp(*LOGVAR_RANGE), **pri}

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., L) -> (params (..., P), predicted R (..., T))."""
        shape = z.shape[:-1]
        flat = z.reshape(-1, self.latent_dim)
        params = self.signal_model.squash(flat[:, :self.n_raw])
        pred = torch.exp(flat[:, -1:]) * self.signal_model.forward(params)
        return params.reshape(*shape, -1), pred.reshape(*shape, -1)

    def loss(self, r, enc, z, beta: float) -> dict:
        sigma = torch.exp(self.log_sigma)
        _, pred = self.decode(z)
        nll = negative_log_likelihood(r[:, None, :], pred, sigma).sum(dim=2)      # (B, K)
        b, k, lat = enc["mu"].shape
        if "chol" in enc:
            # full-covariance q against the Student-t prior (heavy tails: a voxel unlike its
            # neighbours, at a boundary, is not pulled to them): -H(q) - log p(z), one draw
            nu = self.prior_dof
            log_s = 0.5 * self.prior_logvars()                                     # (K, L)
            t = (z - enc["prior_mu"]) * torch.exp(-log_s)
            log_p = (math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
                     - log_s - 0.5 * (nu + 1) * torch.log1p(t ** 2 / nu)).sum(dim=2)
            entropy = 0.5 * lat * (1 + math.log(2 * math.pi)) \
                + torch.log(torch.diagonal(enc["chol"], dim1=2, dim2=3)).sum(dim=2)
            kl_z = -entropy - log_p
        else:
            kl_z = gaussian_kl(enc["mu"].reshape(b * k, lat), enc["logvar"].reshape(b * k, lat),
                               enc["prior_mu"].reshape(b * k, lat),
                               self.prior_logvars().expand(b, k, lat).reshape(b * k, lat)
                               ).reshape(b, k)
        log_q = F.log_softmax(enc["logits"], dim=1)
        q = log_q.exp()
        kl_y = (q * (log_q - torch.log(enc["pi"].clamp_min(1e-12)))).sum(dim=1)
        recon = (q * nll).sum(dim=1).mean()
        kl = ((q * kl_z).sum(dim=1) + kl_y).mean()
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl}

    @torch.no_grad()
    def m_step_terms(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sums over a batch for the M-step: sum q, sum q mu, sum q w E[(z - m)^2] per component
        and latent dimension (w = 1 for the Gaussian prior, the EM weight of the Student-t
        prior's scale with the refined q)."""
        q = F.softmax(enc["logits"].detach(), dim=1)
        var = ((enc["chol"].detach() ** 2).sum(dim=3) if "chol" in enc
               else torch.exp(enc["logvar"].detach()))
        sq = (enc["mu"].detach() - enc["prior_mu"].detach()) ** 2 + var
        if "chol" in enc:
            nu = self.prior_dof
            sq = sq * (nu + 1) / (nu + sq * torch.exp(-self.prior_logvars()))
        return q.sum(dim=0), (q[..., None] * enc["mu"].detach()).sum(dim=0), \
            (q[..., None] * sq).sum(dim=0)

    @torch.no_grad()
    def m_step(self, sums) -> None:
        """The prior's component means and variances that maximise the ELBO given q."""
        n_k, s_mu, s_sq = sums
        has = n_k > 1e-3
        denom = n_k.clamp_min(1e-3)[:, None]
        self.prior_mean[has] = (s_mu / denom)[has]
        self.prior_logvar[has] = torch.log((s_sq / denom).clamp_min(1e-6))[has]

    @torch.no_grad()
    def remember(self, rows, enc) -> None:
        self.memory_mu[rows] = enc["mu"].detach()
        self.memory_q[rows] = F.softmax(enc["logits"].detach(), dim=1)


def _normal(shape, like, generator):
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


class _Data:
    """The series on the device: signals, measured magnitudes, log mean b0, neighbours."""

    def __init__(self, y: np.ndarray, s0: np.ndarray, nbr: np.ndarray, device):
        scale = float(np.median(s0))
        rel = s0 / scale
        self.scale = scale
        self.y = torch.as_tensor(np.ascontiguousarray(y, dtype=np.float32), device=device)
        self.log_s0 = torch.as_tensor(np.log(rel).astype(np.float32), device=device)
        self.r = self.y * torch.exp(self.log_s0)[:, None]
        self.nbr = torch.as_tensor(nbr, device=device)

    def batch(self, rows):
        return self.y[rows], self.log_s0[rows], self.r[rows], self.nbr[rows]


def estimate_sigma(y: np.ndarray, s0: np.ndarray, b0_columns: np.ndarray) -> float:
    """A starting noise sd on the scale of R (median mean b0 = 1) from the spread of the
    repeated b0 volumes: the median over voxels of their sample sd (0.05 with one b0)."""
    if b0_columns.sum() < 2:
        return 0.05
    r = y[:, b0_columns] * (s0 / np.median(s0))[:, None]
    return float(max(np.median(r.std(axis=1, ddof=1)), 1e-4))


# ---- training --------------------------------------------------------------------------------
def _beta(epoch: int, opts: dict) -> float:
    warm, ramp = int(opts["warmup_epochs"]), int(opts["ramp_epochs"])
    if epoch < warm:
        return 0.0
    final = float(opts["beta"])
    return final if ramp == 0 else final * min(1.0, (epoch - warm + 1) / ramp)


@torch.no_grad()
def _refresh(net: SpatialVAE, data: _Data, chunk: int, passes: int = 1,
             m_step: bool = False) -> None:
    """Recompute every voxel's memory with the current encoder (deterministic), and with
    ``m_step`` then set the prior's component means and variances from it."""
    n = data.y.shape[0]
    for _ in range(passes):
        sums = None
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(n, start + chunk), device=data.y.device)
            y, ls0, _, nbr = data.batch(rows)
            enc = net.encode(y, ls0, rows, nbr)
            net.remember(rows, enc)
            if m_step:
                terms = net.m_step_terms(enc)
                sums = terms if sums is None else tuple(a + b for a, b in zip(sums, terms))
        if m_step:
            net.m_step(sums)


@torch.no_grad()
def _init_components(net: SpatialVAE, generator: torch.Generator, iters: int = 25,
                     nbr: torch.Tensor | None = None) -> None:
    """k-means of the memory's latent means (standardised), started from quantiles along their
    first principal axis (deterministic): component means, variances and the memory's
    responsibilities (hard), so that neighbours agree on which component is which."""
    q = net.memory_q
    best = q.argmax(dim=1)
    mu = net.memory_mu[torch.arange(len(best), device=q.device), best]      # (N, L)
    centre, scale = mu.mean(dim=0), mu.std(dim=0).clamp_min(1e-6)
    x = (mu - centre) / scale
    _, _, v = torch.linalg.svd(x[:: max(1, len(x) // 20000)], full_matrices=False)
    proj = x @ v[0]
    k = net.n_components
    qs = torch.quantile(proj, torch.linspace(0.1, 0.9, k, device=x.device, dtype=x.dtype))
    cent = torch.stack([x[(proj - t).abs().argmin()] for t in qs])
    for _ in range(iters):
        label = torch.cdist(x, cent).argmin(dim=1)
        for j in range(k):
            sel = label == j
            if sel.any():
                cent[j] = x[sel].mean(dim=0)
    label = torch.cdist(x, cent).argmin(dim=1)
    for j in range(k):
        sel = label == j
        if sel.sum() > 1:
            net.prior_mean[j] = mu[sel].mean(dim=0)
            net.prior_logvar[j] = torch.log(mu[sel].var(dim=0).clamp_min(1e-4))
        else:
            net.prior_mean[j] = cent[j] * scale + centre
    net.memory_q.copy_(F.one_hot(label, k).to(q.dtype))
    net.memory_mu.copy_(mu[:, None, :].expand_as(net.memory_mu))
    if nbr is not None:
        _set_bandwidth(net, mu, nbr)


@torch.no_grad()
def _set_bandwidth(net: SpatialVAE, mu: torch.Tensor, nbr: torch.Tensor) -> None:
    """The borrowing bandwidth's starting value: 3 x the median absolute difference of the
    latent means ``mu`` (N, L) between neighbours (then learnt)."""
    ok = nbr >= 0
    if not ok.any():
        return
    diff = (mu[:, None, :] - mu[nbr.clamp_min(0)]).abs()[ok]           # (pairs, L)
    net.log_bandwidth.copy_(torch.log(3.0 * diff.median(dim=0).values.clamp_min(1e-3)))


def train_svae(net: SpatialVAE, data: _Data, opts: dict, *, generator: torch.Generator) -> dict:
    device = data.y.device
    n = data.y.shape[0]
    train_idx, val_idx = _split(n, float(opts["validation_fraction"]), generator, device)
    n_train = int(train_idx.numel())
    batch = resolve_batch_size(opts["batch_size"], n_train)
    chunk = int(opts["inference_batch_size"])
    optimiser = torch.optim.Adam(net.parameters(), lr=float(opts["lr"]),
                                 weight_decay=float(opts.get("weight_decay", 0.0)))
    warm = int(opts["warmup_epochs"])
    settled = max(0, schedule_length(opts) - 1)
    history = {k: [] for k in ("loss", "recon", "kl", "beta", "val_loss", "lr", "sigma",
                               "borrow")}
    stopper = EarlyStopping(opts, optimiser, bool(val_idx.numel()))
    net.train()
    epoch = -1
    for epoch in range(int(opts["epochs"])):
        if epoch == warm:
            _refresh(net, data, chunk)
            _init_components(net, generator, nbr=data.nbr)
        beta = _beta(epoch, opts)
        if epoch > warm:
            net.eval()
            _refresh(net, data, chunk, m_step=True)
            net.train()
        order = train_idx[torch.randperm(n_train, generator=generator, device=device)]
        sums = torch.zeros(3, device=device)
        for start in range(0, n_train, batch):
            rows = order[start:start + batch]
            y, ls0, r, nbr = data.batch(rows)
            enc = net.encode(y, ls0, rows, nbr)
            eps = _normal(enc["mu"].shape, enc["mu"], generator)
            z = enc["mu"] + torch.exp(0.5 * enc["logvar"]) * eps
            terms = net.loss(r, enc, z, beta)
            optimiser.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimiser.step()
            net.remember(rows, enc)
            sums += torch.stack([terms["loss"], terms["recon"], terms["kl"]]).detach() * len(rows)
        loss, recon, kl = (sums / n_train).tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"svae: training loss became {loss} at epoch {epoch + 1}; "
                                     "lower the learning rate")
        val = math.nan
        if val_idx.numel():
            net.eval()
            with torch.no_grad():
                total = 0.0
                for start in range(0, int(val_idx.numel()), chunk):
                    rows = val_idx[start:start + chunk]
                    y, ls0, r, nbr = data.batch(rows)
                    enc = net.encode(y, ls0, rows, nbr)
                    net.remember(rows, enc)
                    total += float(net.loss(r, enc, enc["mu"], beta)["loss"]) * len(rows)
                val = total / int(val_idx.numel())
            net.train()
        for key, value in (("loss", loss), ("recon", recon), ("kl", kl), ("beta", beta),
                           ("val_loss", val), ("lr", optimiser.param_groups[0]["lr"]),
                           ("sigma", float(torch.exp(net.log_sigma.detach()))),
                           ("borrow", float(torch.sigmoid(net.mix_logit.detach())))):
            history[key].append(value)
        if epoch < settled:
            continue
        if stopper.update(net, epoch, val if math.isfinite(val) else loss):
            break
    stopper.restore(net)
    net.eval()
    return {"history": history, "best_epoch": stopper.best_epoch + 1, "epochs_run": epoch + 1,
            "n_train": n_train, "n_validation": int(val_idx.numel()), "batch_size": batch}


class _Posterior(nn.Module):
    """Per-voxel variational parameters of q(y) and q(z | y) (semi-amortised inference: they
    start at the encoder's output and are refined on the ELBO)."""

    def __init__(self, net: SpatialVAE, data: _Data, chunk: int,
                 start_raw: torch.Tensor | None = None):
        super().__init__()
        n = data.y.shape[0]
        self.n_lsq_start = 0
        mu = torch.empty_like(net.memory_mu)
        logvar = torch.empty_like(net.memory_mu)
        logits = torch.empty_like(net.memory_q)
        with torch.no_grad():
            for start in range(0, n, chunk):
                rows = torch.arange(start, min(n, start + chunk), device=data.y.device)
                y, ls0, _, nbr = data.batch(rows)
                enc = net.encode(y, ls0, rows, nbr)
                mu[rows], logvar[rows], logits[rows] = enc["mu"], enc["logvar"], enc["logits"]
            if start_raw is not None:
                # each voxel starts at whichever fits its own signal better (Rician NLL): the
                # least-squares fit (in every component) or the encoder's output
                sigma = torch.exp(net.log_sigma)
                for start in range(0, n, chunk):
                    rows = torch.arange(start, min(n, start + chunk), device=data.y.device)
                    r = data.r[rows]
                    best = logits[rows].argmax(dim=1)
                    pick = torch.arange(len(rows), device=r.device)
                    own = mu[rows][pick, best]                                  # (B, L)
                    # least squares of S/S0 has S0 = the voxel's own mean b0
                    alt = torch.cat([start_raw[rows], data.log_s0[rows][:, None]], dim=1)
                    nll = [negative_log_likelihood(r, net.decode(z)[1], sigma).sum(dim=1)
                           for z in (own, alt)]
                    use = (nll[1] < nll[0])[:, None, None]
                    self.n_lsq_start += int(use.sum())
                    mu[rows] = torch.where(use, alt[:, None, :].expand_as(mu[rows]), mu[rows])
            net.memory_mu.copy_(mu)
            net.memory_q.copy_(F.softmax(logits, dim=1))
            _set_bandwidth(net, mu[torch.arange(len(mu), device=mu.device),
                                   logits.argmax(dim=1)], data.nbr)
        self.mu = nn.Parameter(mu)
        self.logvar = nn.Parameter(logvar)
        self.logits = nn.Parameter(logits)
        lat = mu.shape[2]
        # the strictly lower triangle of each q(z | y)'s Cholesky factor: the parameters and S0
        # are correlated in the likelihood, and a diagonal q would understate their sd
        self.offdiag = nn.Parameter(torch.zeros(*mu.shape, lat, device=mu.device))
        self.register_buffer("lower", torch.tril(torch.ones(lat, lat, device=mu.device), -1))

    def __call__(self, net: SpatialVAE, rows, nbr) -> dict:
        pri = net.neighbour_priors(rows, nbr)
        logvar = self.logvar[rows].clamp(*LOGVAR_RANGE)
        chol = torch.diag_embed(torch.exp(0.5 * logvar)) + self.offdiag[rows] * self.lower
        return {"logits": self.logits[rows], "mu": self.mu[rows], "logvar": logvar,
                "chol": chol, **pri}

    @staticmethod
    def sample(enc: dict, generator) -> torch.Tensor:
        eps = _normal(enc["mu"].shape, enc["mu"], generator)
        return enc["mu"] + (enc["chol"] @ eps[..., None])[..., 0]


def refine_posterior(net: SpatialVAE, data: _Data, opts: dict, *, generator: torch.Generator,
                     start_raw: torch.Tensor | None = None) -> tuple[_Posterior, list[float]]:
    """``refine_steps`` Adam steps on every voxel's own q (and the prior's parameters) against
    the full ELBO (beta = ``beta``), full batch in chunks, one draw of z per step, the step size
    decaying linearly to 5 %. Each step's q is the memory the next step's priors read, so the
    spatial prior and the posteriors are updated together (a variational EM)."""
    chunk = int(opts["inference_batch_size"])
    post = _Posterior(net, data, chunk, start_raw)
    steps = int(opts["refine_steps"])
    losses: list[float] = []
    if steps == 0:
        return post, losses
    lr = float(opts["refine_lr"])
    prior_params = [net.mix_logit]
    if isinstance(net.log_sigma, nn.Parameter):
        prior_params.append(net.log_sigma)
    optimiser = torch.optim.Adam([{"params": list(post.parameters()) + [net.log_bandwidth],
                                   "lr": lr}, {"params": prior_params, "lr": 0.1 * lr}])
    start_lrs = [g["lr"] for g in optimiser.param_groups]
    n = data.y.shape[0]
    with torch.no_grad():   # the prior's means and scales as the starting q implies them
        for _ in range(3):
            sums = None
            for start in range(0, n, chunk):
                rows = torch.arange(start, min(n, start + chunk), device=data.y.device)
                terms = net.m_step_terms(post(net, rows, data.nbr[rows]))
                sums = terms if sums is None else tuple(a + b for a, b in zip(sums, terms))
            net.m_step(sums)
    beta = float(opts["beta"])
    for step in range(steps):
        frac = step / max(1, steps - 1)
        for group, base in zip(optimiser.param_groups, start_lrs):
            group["lr"] = base * (1.0 - 0.95 * frac)
        optimiser.zero_grad(set_to_none=True)
        total, sums = 0.0, None
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(n, start + chunk), device=data.y.device)
            _, _, r, nbr = data.batch(rows)
            enc = post(net, rows, nbr)
            z = post.sample(enc, generator)
            loss = net.loss(r, enc, z, beta)["loss"] * (len(rows) / n)
            loss.backward()
            total += float(loss.detach())
            terms = net.m_step_terms(enc)
            sums = terms if sums is None else tuple(a + b for a, b in zip(sums, terms))
        optimiser.step()
        net.m_step(sums)
        with torch.no_grad():
            net.memory_mu.copy_(post.mu)
            net.memory_q.copy_(F.softmax(post.logits, dim=1))
        losses.append(total)
    return post, losses


@torch.no_grad()
def predict_svae(net: SpatialVAE, data: _Data, post: _Posterior, *, chunk: int, n_samples: int,
                 generator: torch.Generator) -> dict[str, np.ndarray]:
    """Posterior means, sd, responsibilities and latent means of every row from the refined q
    (see the module docstring)."""
    net.eval()
    model = net.signal_model
    n = data.y.shape[0]
    parts: dict[str, list] = {}
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk), device=data.y.device)
        _, _, _, nbr = data.batch(rows)
        enc = post(net, rows, nbr)
        q = F.softmax(enc["logits"].float(), dim=1)                   # (B, K)
        best = q.argmax(dim=1)
        pick = torch.arange(len(rows), device=q.device)
        mode_params, _ = net.decode(enc["mu"][pick, best])             # (B, P)
        if n_samples >= 2:
            draws = torch.stack([net.decode(post.sample(enc, generator))[0]
                                 for _ in range(n_samples)])           # (M, B, K, P)
            comp_mean = draws.mean(dim=0)                              # (B, K, P)
            comp_var = draws.var(dim=0)
            mean = (q[..., None] * comp_mean).sum(dim=1)
            var = (q[..., None] * (comp_var + (comp_mean - mean[:, None]) ** 2)).sum(dim=1)
            std = var.clamp_min(0).sqrt()
        else:
            mean, std = mode_params, None
        for sl in (s for p, s in zip(model.parameters, model.param_slices().values())
                   if p.is_direction):
            mean[:, sl] = mode_params[:, sl]
            if std is not None:
                std[:, sl] = float("nan")
        out = {"params": mean, "responsibilities": q, "latent_mean": enc["mu"][pick, best],
               "borrowed": enc["borrowed"][pick, best]}
        if std is not None:
            out["std"] = std
        for key, value in out.items():
            parts.setdefault(key, []).append(value.float().cpu().numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def fit_svae(model: SignalModel, y: np.ndarray, valid: np.ndarray, *, voxel_coords,
             s0=None, device: torch.device, seed: int = 0, options: dict | None = None,
             progress: bool = True) -> FitResult:
    """Train svae on ``y`` (float32 (n_valid, model.n_measurements), b0-normalised signals of
    the valid rows). ``voxel_coords`` (N, 3) and ``s0`` (N,) (each row's mean b0; None: all
    equal, so S0 borrows nothing) are given for all N rows; full-length results, NaN where
    ``valid`` is False."""
    opts = method_options("svae", options, model.name)
    check_options(opts)
    valid = np.asarray(valid, dtype=bool)
    if voxel_coords is None:
        raise ValueError("svae needs each row's voxel indices (voxel_coords) to find its "
                         "neighbours")
    coords = np.asarray(voxel_coords)
    if coords.shape != (valid.size, 3):
        raise ValueError(f"voxel_coords must have shape ({valid.size}, 3), got {coords.shape}")
    s0_rows = np.ones(valid.size) if s0 is None else np.asarray(s0, dtype=np.float64).reshape(-1)
    if s0_rows.size != valid.size:
        raise ValueError(f"s0 has {s0_rows.size} rows for {valid.size} voxels")
    s0_fit = s0_rows[valid]
    if not np.all(np.isfinite(s0_fit) & (s0_fit > 0)):
        raise ValueError("svae needs a positive, finite mean b0 in every fitted voxel")
    if y.shape != (int(valid.sum()), model.n_measurements):
        raise ValueError(f"y must have shape ({int(valid.sum())}, {model.n_measurements}), "
                         f"got {y.shape}")
    nbr = neighbour_index(coords[valid].astype(np.int64), int(opts["connectivity"]))
    device = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    generator = torch.Generator(device=device).manual_seed(seed)
    b0_cols = model.acquisition.b0_mask
    sigma_init = (estimate_sigma(y, s0_fit, b0_cols) if opts["sigma"] == "auto"
                  else float(opts["sigma"]))
    with _matmul_precision(device, bool(opts.get("allow_tf32", False))):
        data = _Data(y, s0_fit, nbr, device)
        width = int(opts.get("hidden_width") or model.n_measurements)
        net = SpatialVAE(model, y.shape[0], nbr.shape[1], hidden_width=width,
                         n_hidden=int(opts["n_hidden_layers"]), activation=opts["activation"],
                         n_components=int(opts["n_components"]),
                         pseudocount=float(opts["prior_pseudocount"]), sigma_init=sigma_init,
                         learn_sigma=opts["sigma"] == "auto",
                         prior_dof=float(opts["prior_dof"])).to(device)
        info = train_svae(net, data, opts, generator=generator)
        hist = info["history"]
        _refresh(net, data, int(opts["inference_batch_size"]), int(opts["refresh_passes"]))
        t1 = time.perf_counter()
        start_raw = None
        if opts["refine_start"] == "lsq":
            from .lsq import solve_lsq
            lsq_opts = method_options("lsq", None, model.name)
            keys = ("max_iter", "tolerance", "n_starts", "batch_size", "dtype", "grid_dpar",
                    "grid_diso")
            start = solve_lsq(model, y, device=device, seed=seed,
                              **{k: lsq_opts[k] for k in keys if k in lsq_opts})
            start_raw = torch.as_tensor(model.unsquash(start), dtype=torch.float32,
                                        device=device)
        post, refine_losses = refine_posterior(net, data, opts, generator=generator,
                                               start_raw=start_raw)
        hist["refine_loss"] = refine_losses
        n_lsq_start = post.n_lsq_start
        sampler = torch.Generator(device=device).manual_seed(seed + 1)
        out = predict_svae(net, data, post, chunk=int(opts["inference_batch_size"]),
                           n_samples=int(opts["n_posterior_samples"]), generator=sampler)
    t2 = time.perf_counter()
    hyper = dict(opts)
    hyper.update(hidden_width=width, latent_dim=net.latent_dim, best_epoch=info["best_epoch"],
                 epochs_run=info["epochs_run"], n_train=info["n_train"],
                 n_validation=info["n_validation"], batch_size_used=info["batch_size"],
                 sigma_used=float(torch.exp(net.log_sigma.detach())) * data.scale,
                 borrow_weight=float(torch.sigmoid(net.mix_logit.detach())),
                 prior_sd=torch.exp(0.5 * net.prior_logvars()).detach().cpu().numpy().round(4).tolist(),
                 n_neighbours=int(nbr.shape[1]), refine_lsq_starts=int(n_lsq_start),
                 bandwidth=torch.exp(net.log_bandwidth.detach()).cpu().numpy().round(4).tolist(),
                 neighbour_weight_median=float(np.median(out.pop("borrowed"))),
                 isolated_voxels=int((nbr < 0).all(axis=1).sum()))
    log.info("%s/svae: %d epochs (best %d) on %s in %.1f s; sigma %.4g", model.name,
             info["epochs_run"], info["best_epoch"], device, t2 - t0, hyper["sigma_used"])
    return FitResult(
        model=model.name, method="svae", params=scatter_rows(out["params"], valid), valid=valid,
        std=scatter_rows(out["std"], valid) if "std" in out else None,
        responsibilities=scatter_rows(out["responsibilities"], valid),
        latent_mean=scatter_rows(out["latent_mean"], valid), history=hist,
        hyperparameters=hyper,
        timings={"fit_seconds": t2 - t0, "voxels_per_second": y.shape[0] / max(t2 - t0, 1e-9),
                 "train_seconds": t1 - t0, "predict_seconds": t2 - t1},
        device=str(device), seed=int(seed))
