"""The three network estimators (SCIENCE.md section 3), their likelihood, losses and posteriors.

Every network maps b0-normalised signals S (N, T) to unconstrained outputs ("raw"), which the
signal model squashes into its physical bounds and turns back into a predicted signal. Training is
self-supervised and the reconstruction term is a proper negative log-likelihood: the Rician
(``noise_model: rician``), non-central chi (``ncchi``, ``n_coils`` channels) or Gaussian NLL of
:mod:`vaemap_bids.physics.noise` with the per-voxel noise level sigma (of the b0-normalised
signal, sigma / S0), summed over the T volumes and averaged over voxels. With ``fit_amplitude``
the prediction is ``a * phi(params)`` with a per-voxel amplitude ``a = exp(u)``: the error of the
noisy mean-b0 normaliser (a nuisance, never reported), so that its uncertainty enters the
posterior of the parameters instead of being read as tissue.

- :class:`SSLNet` (``ssl``; Lim et al. 2022): an MLP with 3 hidden layers as wide as the number of
  measurements, raw -> ``model.squash`` -> ``model.forward``; loss = NLL (maximum likelihood).
- :class:`VAEUniG` (``vaeunig``): encoder (3 hidden layers) -> q(z|S) = N(mu, C C^T) with C lower
  triangular (``posterior_covariance: full``; ``diagonal`` keeps only its diagonal), decoder =
  one linear layer z -> raw; loss = NLL + beta * KL(q(z|S) || N(0, I)).
- :class:`VAEGMM` (``vaegmm``): encoder 1 -> logits of q(y|S) over K components; encoder 2 takes
  (S, one-hot y) -> q(z|S, y) = N(mu_y, C_y C_y^T) for every y (by default the two encoders share
  their hidden layers, as in the paper's Fig. 4: see :class:`VAEGMM`); prior p(y) = Cat(1/K),
  p(z|y) = N(m_y, diag s_y^2) with learnable m_y and s_y. The K components are enumerated, so the
  loss is the exact negative ELBO of the mixture (no Gumbel-softmax sample):
  sum_y q(y|S) [NLL(S | z_y) + beta KL(q(z|S,y) || p(z|y))] + beta KL(q(y|S) || p(y)), with one
  reparameterised z_y per component.

With ``beta = 1`` (``beta: auto``) the loss is the negative ELBO of the likelihood. The learnt
scalar noise level (used when the caller gives no sigma) is one more parameter of that ELBO
(the "calibrated decoder" of Rybkin et al. 2021).

Maps are posterior means of the squashed parameters, E_q[squash(decoder(z))], and ``std`` is
their posterior standard deviation, under q(z|S) (vaeunig) or the mixture sum_y q(y|S) q(z|S,y)
(vaegmm), computed by a Gauss-Hermite product rule when the latent dimension is at most 3 and by
antithetic Monte-Carlo draws otherwise (:func:`posterior_nodes`). Directions are
antipodally symmetric: draws are sign-aligned to the decoded direction at the posterior mode
before they are averaged, and the mean is normalised. Optionally (:func:`refine_posterior`) a few
Levenberg-Marquardt steps per voxel (and component) move the encoder's mean to the MAP of the
exact posterior under the learnt prior, and a Laplace approximation there replaces q.
Random numbers come from an explicit ``torch.Generator``: a fixed seed gives the same maps on
the same device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..physics import noise as noise_lib
from ..physics.base import SignalModel

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "softplus": nn.Softplus, "tanh": nn.Tanh}
NOISE_MODELS = ("rician", "ncchi", "gaussian")
COVARIANCES = ("full", "diagonal")

#: log-variances are kept in this range so that exp() can neither overflow nor underflow.
LOGVAR_RANGE = (-20.0, 10.0)
#: Initial log-variance of q(z|S) (sigma_z ~ 0.05): training starts close to a deterministic
#: autoencoder, and the KL term widens the posterior as the data allow. Starting at the prior
#: width (log sigma^2 = 0) buries the decoder in sampling noise, and the early epochs learn only
#: to shrink every estimate towards the mean.
LOGVAR_INIT = -6.0
#: LM steps of the warm-started E-steps of :func:`empirical_bayes_prior` after the first.
WARM_STEPS = 2
#: Gauss-Hermite product rules are used up to this latent dimension (beyond: Monte-Carlo).
MAX_QUADRATURE_DIM = 3


def check_noise_options(noise_model, n_coils) -> None:
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {noise_model!r}; choose from {list(NOISE_MODELS)}")
    if isinstance(n_coils, bool) or not isinstance(n_coils, (int, np.integer)) or n_coils < 1:
        raise ValueError(f"n_coils must be a positive integer, got {n_coils!r}")


def nll(measured: torch.Tensor, predicted: torch.Tensor, sigma, noise_model: str = "rician",
        n_coils: int = 1) -> torch.Tensor:
    """Elementwise negative log-likelihood of :mod:`vaemap_bids.physics.noise`. ``rician`` is the
    single-channel case (``n_coils`` is ignored), ``ncchi`` the non-central chi of ``n_coils``
    channels."""
    if noise_model == "gaussian":
        return noise_lib.negative_log_likelihood(measured, predicted, sigma, "gaussian")
    coils = 1 if noise_model == "rician" else int(n_coils)
    name = "ncchi" if (noise_model == "ncchi" and "ncchi" in noise_lib.NOISE_MODELS) else "rician"
    return noise_lib.negative_log_likelihood(measured, predicted, sigma, name, coils)


def _init_scale_head(layer: nn.Linear, start: int, stop: int, bias: float) -> None:
    """Outputs ``start:stop`` of ``layer`` start near ``bias`` (small weights)."""
    with torch.no_grad():
        layer.bias[start:stop].fill_(bias)
        layer.weight[start:stop].mul_(0.01)


def mlp(n_in: int, width: int, n_hidden: int, n_out: int | None, activation: str = "relu") -> nn.Sequential:
    """``n_hidden`` fully connected layers of ``width`` units with ``activation``, then a linear
    output layer of ``n_out`` units (none when ``n_out`` is None)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    size = n_in
    for _ in range(n_hidden):
        layers += [nn.Linear(size, width), ACTIVATIONS[activation]()]
        size = width
    if n_out is not None:
        layers.append(nn.Linear(size, n_out))
    return nn.Sequential(*layers)


# ---- Gaussians -------------------------------------------------------------------------------
def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu=None, prior_logvar=None) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per voxel, summed over dimensions
    (diagonal covariances). The prior defaults to N(0, I)."""
    if prior_mu is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)
    return 0.5 * (prior_logvar - logvar
                  + (logvar.exp() + (mu - prior_mu).pow(2)) * torch.exp(-prior_logvar)
                  - 1.0).sum(dim=-1)


def full_gaussian_kl(mu: torch.Tensor, chol: torch.Tensor, prior_mu=None, prior_logvar=None) -> torch.Tensor:
    """KL(N(mu, C C^T) || N(prior_mu, diag e^prior_logvar)) for lower-triangular ``chol`` C with
    a positive diagonal, over the leading dimensions; the prior defaults to N(0, I)."""
    dim = mu.shape[-1]
    var_q = chol.pow(2).sum(dim=-1)                       # diag(C C^T)
    logdet_q = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(dim=-1)
    if prior_mu is None:
        prior_mu, prior_logvar = torch.zeros_like(mu), torch.zeros_like(mu)
    inv = torch.exp(-prior_logvar)
    return 0.5 * ((var_q * inv).sum(-1) + ((mu - prior_mu).pow(2) * inv).sum(-1) - dim
                  + prior_logvar.sum(-1) - logdet_q)


def categorical_kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(Cat(softmax(logits)) || Cat(1/K)) per voxel."""
    log_q = F.log_softmax(logits, dim=-1)
    return (log_q.exp() * log_q).sum(dim=-1) + math.log(logits.shape[-1])


def mixture_kl(logits, mu, chol, prior_mu, prior_logvar) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact KL(q(y, z|S) || p(y, z)) of a K-component mixture, enumerated over y, as
    ``(KL(q(y|S) || Cat(1/K)), sum_y q(y|S) KL(q(z|S,y) || p(z|y)))`` per voxel. ``mu`` (N, K, L),
    ``chol`` (N, K, L, L), ``prior_mu``/``prior_logvar`` (K, L)."""
    q = F.softmax(logits.float(), dim=-1)
    kl_z = full_gaussian_kl(mu, chol, prior_mu.expand_as(mu), prior_logvar.expand_as(mu))
    return categorical_kl_uniform(logits.float()), (q * kl_z).sum(-1)


def _normal(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def posterior_nodes(latent_dim: int, n_samples: int, generator: torch.Generator | None,
                    device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes xi (M, L) and weights (M,) of an expectation over N(0, I_L): a Gauss-Hermite product
    rule with ceil(n^(1/L)) nodes per dimension when L <= MAX_QUADRATURE_DIM (deterministic,
    exact for polynomials of degree < 2 ceil(n^(1/L))), else ``n_samples`` antithetic Monte-Carlo
    draws (xi and -xi, so odd moments cancel exactly)."""
    if latent_dim <= MAX_QUADRATURE_DIM:
        per = max(2, math.ceil(n_samples ** (1.0 / latent_dim) - 1e-9))
        x, w = np.polynomial.hermite_e.hermegauss(per)
        w = w / w.sum()
        grids = np.meshgrid(*([x] * latent_dim), indexing="ij")
        wgrid = np.meshgrid(*([w] * latent_dim), indexing="ij")
        nodes = np.stack([g.ravel() for g in grids], axis=1)
        weights = np.prod(np.stack([g.ravel() for g in wgrid], axis=1), axis=1)
        return (torch.as_tensor(nodes, dtype=dtype, device=device),
                torch.as_tensor(weights, dtype=dtype, device=device))
    half = max(1, n_samples // 2)
    xi = torch.randn((half, latent_dim), generator=generator, device=device, dtype=dtype)
    nodes = torch.cat([xi, -xi])
    return nodes, torch.full((2 * half,), 1.0 / (2 * half), dtype=dtype, device=device)


# ---- networks --------------------------------------------------------------------------------
class PhysicsNet(nn.Module):
    """Shared parts: the bound signal model, the amplitude nuisance and the likelihood."""

    method = ""
    is_vae = False

    def __init__(self, model: SignalModel, noise_model: str = "rician", n_coils: int = 1,
                 fit_amplitude: bool = True, sigma_init: float = 0.05):
        super().__init__()
        check_noise_options(noise_model, n_coils)
        self.signal_model = model
        self.noise_model = noise_model
        self.n_coils = int(n_coils)
        self.fit_amplitude = bool(fit_amplitude)
        #: the learnt scalar noise level (log sigma), used when no sigma is given
        self.log_noise = nn.Parameter(torch.tensor(math.log(float(sigma_init))))

    @property
    def n_out(self) -> int:
        """Raw outputs: the model's, plus log a with ``fit_amplitude``."""
        return self.signal_model.n_raw + int(self.fit_amplitude)

    def physics(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """raw (..., n_out) -> (params in bounds (..., P), predicted signal (..., T))."""
        lead = raw.shape[:-1]
        raw = raw.float().reshape(-1, raw.shape[-1])
        n_raw = self.signal_model.n_raw
        params = self.signal_model.squash(raw[:, :n_raw])
        signal = self.signal_model.forward(params)
        if self.fit_amplitude:
            signal = signal * torch.exp(raw[:, n_raw:n_raw + 1])
        return params.reshape(*lead, -1), signal.reshape(*lead, -1)

    def noise_sigma(self, sigma: torch.Tensor | None) -> torch.Tensor:
        """The given per-voxel sigma (N, 1), or the learnt scalar."""
        return self.log_noise.exp() if sigma is None else sigma

    def nll(self, signal: torch.Tensor, target: torch.Tensor, sigma) -> torch.Tensor:
        """Per-voxel NLL summed over volumes; leading dimensions of ``signal`` beyond the
        target's (components) are kept."""
        return nll(target.float(), signal.float(), sigma, self.noise_model, self.n_coils).sum(-1)


class SSLNet(PhysicsNet):
    """Voxelwise self-supervised MLP (Lim et al. 2022), trained by maximum likelihood."""

    method = "ssl"

    def __init__(self, model: SignalModel, hidden_width: int, n_hidden: int = 3,
                 activation: str = "relu", **noise):
        super().__init__(model, **noise)
        self.net = mlp(model.n_measurements, hidden_width, n_hidden, self.n_out, activation)
        if self.fit_amplitude:
            _init_scale_head(self.net[-1], model.n_raw, self.n_out, 0.0)

    def forward(self, s: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        params, signal = self.physics(self.net(s))
        return {"params": params, "signal": signal}

    deterministic_forward = forward

    def loss(self, s: torch.Tensor, out: dict, beta: float = 0.0, sigma=None) -> dict:
        recon = self.nll(out["signal"], s, self.noise_sigma(sigma)).mean()
        return {"loss": recon, "recon": recon, "kl": recon.new_zeros(())}

    @torch.no_grad()
    def posterior(self, s: torch.Tensor, **_) -> dict:
        return {"params": self.physics(self.net(s))[0]}


class VAEUniG(PhysicsNet):
    """VAE with a univariate Gaussian prior N(0, I) on z and a (full-covariance) Gaussian q."""

    method = "vaeunig"
    is_vae = True
    n_components = 1

    def __init__(self, model: SignalModel, hidden_width: int, latent_dim: int, n_hidden: int = 3,
                 activation: str = "relu", covariance: str = "full", **noise):
        super().__init__(model, **noise)
        self._init_latent(latent_dim, covariance)
        self.encoder = mlp(model.n_measurements, hidden_width, n_hidden, self.n_gauss, activation)
        self.decoder = nn.Linear(latent_dim, self.n_out)
        self._init_heads(self.encoder[-1])

    # -- latent Gaussians
    def _init_latent(self, latent_dim: int, covariance: str) -> None:
        if covariance not in COVARIANCES:
            raise ValueError(f"unknown posterior covariance {covariance!r}; choose from "
                             f"{list(COVARIANCES)}")
        self.latent_dim = int(latent_dim)
        self.full_covariance = covariance == "full"
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("_tril", rows * latent_dim + cols, persistent=False)
        self.n_off = int(rows.numel()) if self.full_covariance else 0
        self.n_gauss = 2 * latent_dim + self.n_off

    def _init_heads(self, layer: nn.Linear) -> None:
        L = self.latent_dim
        _init_scale_head(layer, L, 2 * L, 0.5 * LOGVAR_INIT)      # log sd of the diagonal
        _init_scale_head(layer, 2 * L, self.n_gauss, 0.0)          # off-diagonal of C

    def gaussian(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (..., n_gauss) -> (mu (..., L), C (..., L, L) lower triangular)."""
        L = self.latent_dim
        mu = out[..., :L].float()
        log_sd = out[..., L:2 * L].float().clamp(0.5 * LOGVAR_RANGE[0], 0.5 * LOGVAR_RANGE[1])
        chol = torch.diag_embed(log_sd.exp())
        if self.n_off:
            off = out.new_zeros(out.shape[:-1] + (L * L,), dtype=torch.float32)
            off[..., self._tril] = out[..., 2 * L:].float()
            chol = chol + off.reshape(out.shape[:-1] + (L, L))
        return mu, chol

    def encode(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gaussian(self.encoder(s))

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.physics(self.decoder(z))

    def decode_params(self, z: torch.Tensor) -> torch.Tensor:
        """Only the squashed parameters of z (..., L) (no signal): for posterior moments."""
        raw = self.decoder(z).float()
        lead = raw.shape[:-1]
        n_raw = self.signal_model.n_raw
        return self.signal_model.squash(raw.reshape(-1, raw.shape[-1])[:, :n_raw]).reshape(*lead, -1)

    @staticmethod
    def sample(mu, chol, eps):
        return mu + (chol @ eps.unsqueeze(-1)).squeeze(-1)

    # -- the components: vaeunig is the one-component case of the mixture code below
    def components(self, s: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(logits (N, K) or None, mu (N, K, L), C (N, K, L, L))."""
        mu, chol = self.encode(s)
        return None, mu.unsqueeze(1), chol.unsqueeze(1)

    def prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and log-variances (K, L) of p(z|y)."""
        zeros = self.decoder.weight.new_zeros(1, self.latent_dim)
        return zeros, zeros

    def weights(self, logits) -> torch.Tensor | None:
        return None if logits is None else F.softmax(logits.float(), dim=-1)

    def _forward(self, s, eps_fn) -> dict:
        logits, mu, chol = self.components(s)
        z = mu if eps_fn is None else self.sample(mu, chol, eps_fn(mu))
        params, signal = self.decode(z)
        return {"params": params, "signal": signal, "mu": mu, "chol": chol, "z": z,
                "logits": logits}

    def forward(self, s: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        return self._forward(s, lambda mu: _normal(mu.shape, mu, generator))

    def deterministic_forward(self, s: torch.Tensor) -> dict:
        """The loss terms at z = mu (used for the validation loss, so early stopping does not
        follow sampling noise)."""
        return self._forward(s, None)

    def kl_terms(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL of y, KL of z) averaged over voxels (the first is 0 without components)."""
        pm, plv = self.prior()
        if out["logits"] is None:
            kl_z = full_gaussian_kl(out["mu"], out["chol"], pm.expand_as(out["mu"]),
                                    plv.expand_as(out["mu"]))[:, 0]
            return kl_z.new_zeros(()), kl_z.mean()
        kl_y, kl_z = mixture_kl(out["logits"], out["mu"], out["chol"], pm, plv)
        return kl_y.mean(), kl_z.mean()

    def kl(self, out: dict) -> torch.Tensor:
        kl_y, kl_z = self.kl_terms(out)
        return kl_y + kl_z

    def loss(self, s: torch.Tensor, out: dict, beta: float = 1.0, sigma=None) -> dict:
        sig = self.noise_sigma(sigma)
        per = self.nll(out["signal"], s.unsqueeze(1), sig if sig.dim() == 0 else sig.unsqueeze(1))
        w = self.weights(out["logits"])
        recon = (per[:, 0] if w is None else (w * per).sum(-1)).mean()
        kl = self.kl(out)
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl}

    # -- posterior summaries
    @torch.no_grad()
    def posterior(self, s: torch.Tensor, *, nodes: torch.Tensor | None = None,
                  node_weights: torch.Tensor | None = None, sigma=None,
                  refine_steps: int = 0) -> dict:
        """Posterior mean and std of the squashed parameters, the latent posterior mean and, with
        components, the responsibilities q(y|S). ``refine_steps`` > 0 first replaces q by the
        Laplace approximation at the MAP (:func:`refine_posterior`)."""
        logits, mu, chol = self.components(s)
        w = (torch.ones(mu.shape[:2], device=mu.device) if logits is None
             else self.weights(logits))
        out = {}
        if refine_steps > 0:
            prior = getattr(self, "refined_prior", None) or network_prior(self)
            mu, chol, log_ev = refine_posterior(self, s, mu, self.noise_sigma(sigma), prior,
                                                n_steps=refine_steps)
            w = torch.softmax(log_ev, dim=1)
        out["latent_mean"] = (w.unsqueeze(-1) * mu).sum(1)
        if logits is not None:
            out["responsibilities"] = w
        if nodes is None:
            nodes, node_weights = posterior_nodes(self.latent_dim, 2, None, mu.device)
        mean, std = mixture_moments(self, w, mu, chol, nodes, node_weights)
        out["params"], out["std"] = mean, std
        return out


class VAEGMM(VAEUniG):
    """VAE with a Gaussian-mixture prior: p(y) = Cat(1/K), p(z|y) = N(m_y, diag s_y^2).

    ``shared_encoder=False``: encoder 1 (S -> logits) and encoder 2 ((S, y) -> q(z|S,y)) are two
    MLPs of ``n_hidden`` layers. ``shared_encoder=True`` (the layout of the paper's Fig. 4 and
    code): one trunk of ``n_hidden`` layers h(S) feeds a linear head h -> logits and a linear head
    (h, one-hot y) -> q(z|S,y), so encoder 2 is still a function of (S, y) and the one-hot adds a
    learnt offset per component: all K components cost one trunk and one head.
    """

    method = "vaegmm"

    def __init__(self, model: SignalModel, hidden_width: int, latent_dim: int, n_components: int,
                 n_hidden: int = 3, activation: str = "relu", prior_spread: float = 1.0,
                 shared_encoder: bool = True, covariance: str = "full", **noise):
        PhysicsNet.__init__(self, model, **noise)
        self._init_latent(latent_dim, covariance)
        self.n_components = int(n_components)
        self.shared_encoder = bool(shared_encoder)
        t, K = model.n_measurements, self.n_components
        if shared_encoder:
            self.trunk = mlp(t, hidden_width, n_hidden, None, activation)
            self.encoder_y = nn.Linear(hidden_width, K)
            self.encoder = nn.Linear(hidden_width + K, self.n_gauss)
        else:
            self.trunk = nn.Identity()
            self.encoder_y = mlp(t, hidden_width, n_hidden, K, activation)
            self.encoder = mlp(t + K, hidden_width, n_hidden, self.n_gauss, activation)
        self.decoder = nn.Linear(latent_dim, self.n_out)
        self._init_heads(self.encoder if shared_encoder else self.encoder[-1])
        # Distinct starting means (drawn under the caller's torch seed) so that the components
        # can separate; unit variances, like the N(0, I) prior of vaeunig.
        self.prior_mean = nn.Parameter(prior_spread * torch.randn(K, latent_dim))
        self.prior_logvar = nn.Parameter(torch.zeros(K, latent_dim))

    def prior(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prior_mean, self.prior_logvar.clamp(*LOGVAR_RANGE)

    def components(self, s: torch.Tensor):
        h = self.trunk(s)
        logits = self.encoder_y(h)
        K = self.n_components
        if self.shared_encoder:
            width = h.shape[1]
            base = F.linear(h, self.encoder.weight[:, :width], self.encoder.bias)
            out = base.unsqueeze(1) + self.encoder.weight[:, width:].T.unsqueeze(0)  # (N, K, G)
        else:
            n = s.shape[0]
            eye = torch.eye(K, device=s.device, dtype=s.dtype)
            inp = torch.cat([s.unsqueeze(1).expand(n, K, s.shape[1]),
                             eye.unsqueeze(0).expand(n, K, K)], dim=2)
            out = self.encoder(inp.reshape(n * K, -1)).reshape(n, K, -1)
        mu, chol = self.gaussian(out)
        return logits, mu, chol


# ---- posterior moments and refinement ---------------------------------------------------------
def _align_directions(net: PhysicsNet, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Flip every drawn direction (antipodal symmetry) onto the side of ``ref``."""
    for p, sl in zip(net.signal_model.parameters, net.signal_model.param_slices().values()):
        if p.is_direction:
            d = x[..., sl]
            sign = torch.where((d * ref[..., sl]).sum(-1, keepdim=True) < 0, -1.0, 1.0)
            x = torch.cat([x[..., :sl.start], d * sign, x[..., sl.stop:]], dim=-1)
    return x


@torch.no_grad()
def mixture_moments(net: VAEUniG, weights, mu, chol, nodes, node_weights, block: int = 16):
    """Mean and std of squash(decoder(z)) under sum_k weights_k N(mu_k, C_k C_k^T): ``weights``
    (N, K), ``mu`` (N, K, L), ``chol`` (N, K, L, L), quadrature ``nodes`` (M, L) and
    ``node_weights`` (M,) summing to 1. Moments are accumulated around the decoded mode of the
    most probable component (no cancellation in float32)."""
    n = mu.shape[0]
    top = weights.argmax(1)
    ref = net.decode_params(mu[torch.arange(n, device=mu.device), top])  # (N, P)
    s1 = torch.zeros_like(ref)
    s2 = torch.zeros_like(ref)
    for start in range(0, nodes.shape[0], block):
        xi, wn = nodes[start:start + block], node_weights[start:start + block]
        z = mu.unsqueeze(0) + torch.einsum("nkij,mj->mnki", chol, xi)      # (m, N, K, L)
        x = net.decode_params(z)                                         # (m, N, K, P)
        d = _align_directions(net, x, ref[None, :, None]) - ref[None, :, None]
        w = wn[:, None, None, None] * weights[None, :, :, None]
        s1 += (w * d).sum((0, 2))
        s2 += (w * d * d).sum((0, 2))
    mean = ref + s1
    std = (s2 - s1 * s1).clamp_min(0.0).sqrt()
    for p, sl in zip(net.signal_model.parameters, net.signal_model.param_slices().values()):
        if p.is_direction:
            mean[:, sl] = mean[:, sl] / mean[:, sl].norm(dim=1, keepdim=True).clamp_min(1e-8)
    return mean, std


def _nll_derivatives(net: PhysicsNet, nu: torch.Tensor, s: torch.Tensor, sigma):
    """Elementwise first and second derivatives of the NLL with respect to the prediction nu:
    closed forms for Gaussian and Rician (with R = I1/I0 at x = m nu / sigma^2:
    d/dnu = (nu - m R) / sigma^2, d2/dnu2 = (1 - (m / sigma)^2 (1 - R/x - R^2)) / sigma^2),
    autograd for non-central chi."""
    sig = torch.as_tensor(sigma, dtype=nu.dtype, device=nu.device)
    var = sig * sig
    if net.noise_model == "gaussian":
        return (nu - s) / var, (1.0 / var).expand_as(nu)
    if net.noise_model == "rician" or net.n_coils == 1:
        m = s.clamp_min(0.0)
        x = (m * nu / var).clamp_min(1e-6)
        r = torch.special.i1e(x) / torch.special.i0e(x)
        g = (nu - m * r) / var
        h = (1.0 - (m * m / var) * (1.0 - r / x - r * r)) / var
        return g, h
    with torch.enable_grad():
        nu = nu.detach().requires_grad_(True)
        value = nll(s, nu, sigma, net.noise_model, net.n_coils)
        (g,) = torch.autograd.grad(value.sum(), nu, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), nu)
    return g.detach(), h


def _energy(net, z, s, sigma, pm, prec):
    """-log p(S|z) - log p(z|y) + const per row: NLL + 1/2 (z - m)^T P (z - m)."""
    signal = net.decode(z)[1]
    d = z - pm
    return net.nll(signal, s, sigma) + 0.5 * (d * (prec @ d.unsqueeze(-1)).squeeze(-1)).sum(-1)


def _jacobian(net, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted signal (R, T) and its exact Jacobian d signal / d z (R, T, L): one forward-mode
    product over the rows repeated L times with the unit tangents (rows are independent)."""
    R, L = z.shape
    tangents = torch.eye(L, device=z.device, dtype=z.dtype).repeat_interleave(R, 0)
    signal, cols = torch.func.jvp(lambda v: net.decode(v)[1], (z.repeat(L, 1),), (tangents,))
    return signal[:R], cols.reshape(L, R, -1).permute(1, 2, 0)


def network_prior(net: VAEUniG) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network's own prior as (log p(y) (K,), means (K, L), precisions (K, L, L))."""
    pm, plv = net.prior()
    K = pm.shape[0]
    log_pi = torch.full((K,), -math.log(K), device=pm.device)
    return log_pi, pm.detach().float(), torch.diag_embed(torch.exp(-plv.detach().float()))


@torch.no_grad()
def refine_posterior(net: VAEUniG, s: torch.Tensor, z0: torch.Tensor, sigma, prior,
                     n_steps: int = 5, damping: float = 1e-3):
    """Levenberg-Marquardt on the exact negative log posterior of every voxel and component,
    E_k(z) = NLL(S | decoder(z)) + 1/2 (z - m_k)^T P_k (z - m_k), started at ``z0`` (N, K, L);
    ``prior`` = (log p(y) (K,), m (K, L), P (K, L, L)). Returns the MAP (N, K, L), the Cholesky
    factor of the Laplace covariance H^-1 with H = J^T diag(h) J + P_k (N, K, L, L; J the
    Jacobian of the prediction in z, h >= 0 the NLL's curvature in the prediction, exact and
    clipped at 0) and the Laplace log evidence log p(y=k) + log p(S | y=k) up to a constant
    (N, K). A step is kept only where it lowers E."""
    n, K, L = z0.shape
    log_pi, pm, prec = prior
    pm = pm.expand(n, K, L).reshape(-1, L)
    prec = prec.expand(n, K, L, L).reshape(-1, L, L)
    target = s.unsqueeze(1).expand(n, K, s.shape[1]).reshape(n * K, -1).float()
    sig = sigma if (not torch.is_tensor(sigma) or sigma.dim() == 0) else \
        sigma.unsqueeze(1).expand(n, K, 1).reshape(n * K, 1)
    z = z0.reshape(-1, L).clone()
    lam = torch.full((n * K, 1), float(damping), device=z.device)

    def system(zv):
        signal, jac = _jacobian(net, zv)
        g, h = _nll_derivatives(net, signal, target, sig)
        grad = (jac * g.unsqueeze(-1)).sum(1) + (prec @ (zv - pm).unsqueeze(-1)).squeeze(-1)
        hess = jac.transpose(1, 2) @ (jac * h.clamp_min(0.0).unsqueeze(-1)) + prec
        return grad, hess

    energy = _energy(net, z, target, sig, pm, prec)
    for _ in range(int(n_steps)):
        grad, hess = system(z)
        diag = torch.diagonal(hess, dim1=1, dim2=2)
        floor = 1e-9 * diag.amax(1, keepdim=True) + 1e-12
        damped = hess + torch.diag_embed(lam * diag + floor)
        step, fail = torch.linalg.solve_ex(damped, -grad.unsqueeze(-1))
        step = torch.nan_to_num(step.squeeze(-1), nan=0.0, posinf=0.0, neginf=0.0)
        cand = z + step
        e_new = _energy(net, cand, target, sig, pm, prec)
        better = torch.isfinite(e_new) & (e_new < energy) & (fail == 0)
        z = torch.where(better.unsqueeze(-1), cand, z)
        energy = torch.where(better, e_new, energy)
        lam = torch.where(better.unsqueeze(-1), lam / 3.0, lam * 4.0).clamp(1e-7, 1e7)
    _, hess = system(z)
    lchol_h, info_h = torch.linalg.cholesky_ex(hess)           # H = R R^T
    eye = torch.eye(L, device=z.device).expand_as(hess)
    inv_r = torch.linalg.solve_triangular(lchol_h, eye, upper=False)
    cov = inv_r.transpose(1, 2) @ inv_r                          # H^-1
    lchol, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.transpose(1, 2)))
    bad = (info != 0) | (info_h != 0) | ~torch.isfinite(lchol).all(-1).all(-1)
    if bad.any():  # numerically indefinite: a tiny covariance there (the MAP's spread is unknown)
        lchol = torch.where(bad[:, None, None], 1e-6 * eye, lchol)
    logdet_h = 2.0 * torch.log(torch.diagonal(lchol_h, dim1=1, dim2=2)).sum(-1)
    logdet_p = torch.logdet(prec)
    log_ev = -energy - 0.5 * logdet_h + 0.5 * logdet_p
    log_ev = torch.where(bad | ~torch.isfinite(log_ev), torch.full_like(log_ev, -1e30), log_ev)
    return (z.reshape(n, K, L), lchol.reshape(n, K, L, L),
            log_ev.reshape(n, K) + log_pi.unsqueeze(0))


@torch.no_grad()
def empirical_bayes_prior(net: VAEUniG, data: torch.Tensor, sigma, *, n_iter: int, n_steps: int,
                          chunk: int, ridge: float = 1e-4):
    """Re-estimate the mixture prior p(y) p(z|y) (full covariances) on the subject's own voxels by
    the EM of the marginal likelihood, with Laplace approximations of every voxel's posterior
    (:func:`refine_posterior`): E-step = MAP z_ik, covariance H_ik^-1 and responsibilities
    r_ik from the Laplace evidence; M-step = pi_k = mean r_ik, m_k = weighted mean of z_ik,
    V_k = weighted mean of (z_ik - m_k)(z_ik - m_k)^T + H_ik^-1 (+ ``ridge`` I). Starts from the
    network's prior and the encoder's means with ``n_steps`` LM steps, then warm-starts every
    E-step at the previous MAP with at most WARM_STEPS steps (the prior moves little per step).
    Returns (log pi (K,), m (K, L), P = V^-1 (K, L, L)); no truth is used."""
    prior = network_prior(net)
    n = data.shape[0]
    z_all = []
    for start in range(0, n, chunk):
        z_all.append(net.components(data[start:start + chunk])[1].float())
    z_all = torch.cat(z_all)
    K, L = z_all.shape[1], z_all.shape[2]
    eye = torch.eye(L, device=data.device)
    for it in range(int(n_iter)):
        steps = n_steps if it == 0 else min(int(n_steps), WARM_STEPS)
        s0 = torch.zeros(K, device=data.device)
        s1 = torch.zeros(K, L, device=data.device)
        s2 = torch.zeros(K, L, L, device=data.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            sig = sigma if (not torch.is_tensor(sigma) or sigma.dim() == 0) else sigma[rows]
            z, chol, log_ev = refine_posterior(net, data[rows], z_all[rows], sig, prior, steps)
            z_all[rows] = z
            r = torch.softmax(log_ev, dim=1)
            s0 += r.sum(0)
            s1 += (r.unsqueeze(-1) * z).sum(0)
            outer = z.unsqueeze(-1) * z.unsqueeze(-2) + chol @ chol.transpose(-1, -2)
            s2 += (r[..., None, None] * outer).sum(0)
        nk = s0.clamp_min(1e-6)
        mean = s1 / nk[:, None]
        cov = s2 / nk[:, None, None] - mean.unsqueeze(-1) * mean.unsqueeze(-2) + ridge * eye
        log_pi = torch.log((nk / nk.sum()).clamp_min(1e-6))
        prior = (log_pi, mean, torch.linalg.inv(0.5 * (cov + cov.transpose(1, 2))))
    return prior


def build_network(method: str, model: SignalModel, opts: dict, sigma_init: float = 0.05) -> PhysicsNet:
    """The network of ``method`` for ``model`` from resolved options (see hyperparameters.yaml)."""
    width = int(opts.get("hidden_width") or model.n_measurements)
    noise = dict(noise_model=opts.get("noise_model", "rician"), n_coils=int(opts.get("n_coils", 1)),
                 fit_amplitude=bool(opts.get("fit_amplitude", True)), sigma_init=sigma_init)
    common = dict(n_hidden=int(opts["n_hidden_layers"]), activation=opts["activation"], **noise)
    if method == "ssl":
        return SSLNet(model, width, **common)
    latent = int(opts.get("latent_dim") or (model.n_raw + int(noise["fit_amplitude"])))
    cov = opts.get("posterior_covariance", "full")
    if method == "vaeunig":
        return VAEUniG(model, width, latent, covariance=cov, **common)
    if method == "vaegmm":
        return VAEGMM(model, width, latent, int(opts["n_components"]),
                      prior_spread=float(opts["prior_spread"]),
                      shared_encoder=bool(opts.get("shared_encoder", True)), covariance=cov,
                      **common)
    raise ValueError(f"{method!r} is not a network method; choose from ssl, vaeunig, vaegmm")
