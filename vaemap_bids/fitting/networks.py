"""The three network estimators (SCIENCE.md section 3) and their losses.

Every network maps b0-normalised signals S (N, T) to unconstrained outputs ("raw"), which the
signal model squashes into its physical bounds and turns back into a predicted signal. Training is
self-supervised: the reconstruction term is MSE(phi(params), S), averaged over voxels and volumes.

- :class:`SSLNet` (``ssl``; Lim et al. 2022): an MLP with 3 hidden layers as wide as the number of
  measurements, raw -> ``model.squash`` -> ``model.forward``.
- :class:`VAEUniG` (``vaeunig``): encoder (3 hidden layers) -> (mu, log sigma^2) of z,
  ``z = mu + sigma * eps`` with ``eps ~ N(0, I)``, decoder = one linear layer z -> raw;
  loss = MSE + beta * KL(q(z|S) || N(0, I)).
- :class:`VAEGMM` (``vaegmm``): encoder 1 -> logits of a categorical y over K components,
  ``c = GumbelSoftmax(logits, tau)``; encoder 2 takes (S, c) -> (mu, log sigma^2) (by default the
  two encoders share their hidden layers, as in the paper's Fig. 4: see :class:`VAEGMM`);
  prior p(y) = Cat(1/K), p(z|y) = N(m_y, diag s_y^2) with learnable m_y and s_y;
  loss = MSE + beta * [KL(q(y|S) || p(y)) + KL(q(z|S,c) || p(z|c))], where p(z|c) is the Gaussian
  with the c-weighted component mean ``c @ m`` and variance ``c @ s^2`` (the same soft selection
  that encoder 2 sees, so the KL is taken against the prior of the component that z came from).

Maps are decoded from the posterior mean: decoder(mu); for vaegmm mu is taken at the one-hot c of
the most probable component (argmax q(y|S)). The KL terms are summed over latent dimensions and
averaged over voxels. Random numbers (Gumbel
and Gaussian noise) are drawn from an explicit ``torch.Generator`` so that a fixed seed gives the
same maps on the same device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..physics.base import SignalModel

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "softplus": nn.Softplus, "tanh": nn.Tanh}

#: log-variances are kept in this range so that exp() can neither overflow nor underflow.
LOGVAR_RANGE = (-20.0, 10.0)
#: Initial log-variance of q(z|S) (sigma_z ~ 0.05): training starts close to a deterministic
#: autoencoder, and the KL term widens the posterior as the data allow. Starting at the prior
#: width (log sigma^2 = 0) buries the decoder in sampling noise, and the early epochs learn only
#: to shrink every estimate towards the mean.
LOGVAR_INIT = -6.0


def _init_logvar_head(layer: nn.Linear, latent_dim: int) -> None:
    """The last ``latent_dim`` outputs of ``layer`` are log sigma^2: start them at LOGVAR_INIT."""
    with torch.no_grad():
        layer.bias[latent_dim:].fill_(LOGVAR_INIT)
        layer.weight[latent_dim:].mul_(0.01)


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


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu=None, prior_logvar=None) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per voxel, summed over dimensions.
    The prior defaults to N(0, I)."""
    if prior_mu is None:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
    return 0.5 * (prior_logvar - logvar
                  + (logvar.exp() + (mu - prior_mu).pow(2)) * torch.exp(-prior_logvar)
                  - 1.0).sum(dim=1)


def categorical_kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(Cat(softmax(logits)) || Cat(1/K)) per voxel."""
    log_q = F.log_softmax(logits, dim=1)
    return (log_q.exp() * log_q).sum(dim=1) + math.log(logits.shape[1])


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """Relaxed one-hot sample softmax((logits + g) / tau), g ~ Gumbel(0, 1) drawn from
    ``generator`` (``F.gumbel_softmax`` cannot take one, so it is not reproducible)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    g = -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))
    return F.softmax((logits + g) / tau, dim=1)


def _normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class PhysicsNet(nn.Module):
    """Shared parts: the bound signal model and the reconstruction term."""

    method = ""
    is_vae = False

    def __init__(self, model: SignalModel):
        super().__init__()
        self.signal_model = model

    def physics(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """raw -> (params in bounds, predicted signal)."""
        params = self.signal_model.squash(raw.float())
        return params, self.signal_model.forward(params)

    @staticmethod
    def recon_loss(signal: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(signal.float(), target.float())

    def set_temperature(self, tau: float) -> None:
        """Only the Gumbel-softmax of :class:`VAEGMM` has a temperature."""


class SSLNet(PhysicsNet):
    """Voxelwise self-supervised MLP (Lim et al. 2022)."""

    method = "ssl"

    def __init__(self, model: SignalModel, hidden_width: int, n_hidden: int = 3,
                 activation: str = "relu"):
        super().__init__(model)
        self.net = mlp(model.n_measurements, hidden_width, n_hidden, model.n_raw, activation)

    def forward(self, s: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        params, signal = self.physics(self.net(s))
        return {"params": params, "signal": signal}

    def loss(self, s: torch.Tensor, out: dict, beta: float = 0.0) -> dict:
        recon = self.recon_loss(out["signal"], s)
        zero = recon.new_zeros(())
        return {"loss": recon, "recon": recon, "kl": zero}

    @torch.no_grad()
    def posterior_mean(self, s: torch.Tensor) -> dict:
        return {"params": self.physics(self.net(s))[0]}


class VAEUniG(PhysicsNet):
    """VAE with a univariate Gaussian prior N(0, I) on z."""

    method = "vaeunig"
    is_vae = True

    def __init__(self, model: SignalModel, hidden_width: int, latent_dim: int, n_hidden: int = 3,
                 activation: str = "relu"):
        super().__init__(model)
        self.latent_dim = latent_dim
        self.encoder = mlp(model.n_measurements, hidden_width, n_hidden, 2 * latent_dim, activation)
        self.decoder = nn.Linear(latent_dim, model.n_raw)
        _init_logvar_head(self.encoder[-1], latent_dim)

    def encode(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(s).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.physics(self.decoder(z))

    def forward(self, s: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        mu, logvar = self.encode(s)
        z = mu + torch.exp(0.5 * logvar) * _normal(mu, generator)
        params, signal = self.decode(z)
        return {"params": params, "signal": signal, "mu": mu, "logvar": logvar, "z": z}

    def kl(self, out: dict) -> torch.Tensor:
        return gaussian_kl(out["mu"].float(), out["logvar"].float()).mean()

    def loss(self, s: torch.Tensor, out: dict, beta: float = 0.0) -> dict:
        recon = self.recon_loss(out["signal"], s)
        kl = self.kl(out)
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl}

    @torch.no_grad()
    def posterior_mean(self, s: torch.Tensor) -> dict:
        """Maps from decoder(mu), i.e. the decoded posterior mean of z."""
        mu, _ = self.encode(s)
        return {"params": self.decode(mu)[0], "latent_mean": mu}

    def deterministic_forward(self, s: torch.Tensor) -> dict:
        """The loss terms at z = mu (used for the validation loss, so early stopping does not
        follow sampling noise)."""
        mu, logvar = self.encode(s)
        params, signal = self.decode(mu)
        return {"params": params, "signal": signal, "mu": mu, "logvar": logvar}

    @torch.no_grad()
    def posterior_samples(self, s: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """``n`` draws of the parameters from the posterior, shape (n, N, P): the encoder runs
        once, the decoder once per draw of z."""
        mu, logvar = self.encode(s)
        sd = torch.exp(0.5 * logvar)
        return torch.stack([self.decode(mu + sd * _normal(mu, generator))[0] for _ in range(n)])


class VAEGMM(VAEUniG):
    """VAE with a Gaussian-mixture prior: p(y) = Cat(1/K), p(z|y) = N(m_y, diag s_y^2).

    ``shared_encoder=False``: encoder 1 (S -> logits) and encoder 2 ((S, c) -> mu, log sigma^2)
    are two MLPs of ``n_hidden`` layers. ``shared_encoder=True`` (the layout of the paper's Fig. 4
    and code): one trunk of ``n_hidden`` layers h(S) feeds a linear head h -> logits and a linear
    head (h, c) -> (mu, log sigma^2), so encoder 2 is still a function of (S, c), c shifts the
    posterior mean by a learnt offset per component, and a step costs about half as much.
    """

    method = "vaegmm"

    def __init__(self, model: SignalModel, hidden_width: int, latent_dim: int, n_components: int,
                 n_hidden: int = 3, activation: str = "relu", tau: float = 1.0,
                 prior_spread: float = 1.0, shared_encoder: bool = True):
        PhysicsNet.__init__(self, model)
        self.latent_dim = latent_dim
        self.n_components = n_components
        self.tau = float(tau)
        t = model.n_measurements
        if shared_encoder:
            self.trunk = mlp(t, hidden_width, n_hidden, None, activation)
            self.encoder_y = nn.Linear(hidden_width, n_components)
            self.encoder = nn.Linear(hidden_width + n_components, 2 * latent_dim)
        else:
            self.trunk = nn.Identity()
            self.encoder_y = mlp(t, hidden_width, n_hidden, n_components, activation)
            self.encoder = mlp(t + n_components, hidden_width, n_hidden, 2 * latent_dim, activation)
        self.decoder = nn.Linear(latent_dim, model.n_raw)
        _init_logvar_head(self.encoder if shared_encoder else self.encoder[-1], latent_dim)
        # Distinct starting means (drawn under the caller's torch seed) so that the components
        # can separate; unit variances, like the N(0, I) prior of vaeunig.
        self.prior_mean = nn.Parameter(prior_spread * torch.randn(n_components, latent_dim))
        self.prior_logvar = nn.Parameter(torch.zeros(n_components, latent_dim))

    def set_temperature(self, tau: float) -> None:
        self.tau = float(tau)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of q(y|S) from the encoder input ``h = self.trunk(S)``."""
        return self.encoder_y(h)

    def encode_given(self, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma^2) of q(z|S, c) from ``h = self.trunk(S)`` and ``c``."""
        mu, logvar = self.encoder(torch.cat([h, c.to(h.dtype)], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def prior_given(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(z|c): the c-weighted component mean and variance."""
        c = c.float()
        mean = c @ self.prior_mean
        var = c @ self.prior_logvar.clamp(*LOGVAR_RANGE).exp()
        return mean, var.log()

    def _forward_c(self, h, c, z_noise: torch.Tensor | None) -> dict:
        mu, logvar = self.encode_given(h, c)
        z = mu if z_noise is None else mu + torch.exp(0.5 * logvar) * z_noise
        params, signal = self.decode(z)
        return {"params": params, "signal": signal, "mu": mu, "logvar": logvar, "z": z, "c": c}

    def forward(self, s: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        h = self.trunk(s)
        logits = self.logits(h)
        c = gumbel_softmax(logits.float(), self.tau, generator)
        mu_shape = torch.empty(s.shape[0], self.latent_dim, device=s.device)
        out = self._forward_c(h, c, _normal(mu_shape, generator))
        out["logits"] = logits
        return out

    @staticmethod
    def deterministic_c(logits: torch.Tensor) -> torch.Tensor:
        """The one-hot of the most probable component, argmax q(y|S). At the final (low)
        temperature the Gumbel-softmax samples that encoder 2 was trained on are nearly one-hot,
        so this input is in their distribution; a soft softmax(logits / tau) is not when q(y|S)
        is undecided between components."""
        return F.one_hot(logits.argmax(dim=1), logits.shape[1]).float()

    def deterministic_forward(self, s: torch.Tensor) -> dict:
        h = self.trunk(s)
        logits = self.logits(h)
        out = self._forward_c(h, self.deterministic_c(logits), None)
        out["logits"] = logits
        return out

    def kl_terms(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        kl_y = categorical_kl_uniform(out["logits"].float()).mean()
        prior_mu, prior_logvar = self.prior_given(out["c"])
        kl_z = gaussian_kl(out["mu"].float(), out["logvar"].float(), prior_mu, prior_logvar).mean()
        return kl_y, kl_z

    def kl(self, out: dict) -> torch.Tensor:
        kl_y, kl_z = self.kl_terms(out)
        return kl_y + kl_z

    @torch.no_grad()
    def posterior_samples(self, s: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """``n`` draws from q(y, z | S): c by Gumbel-softmax at the current (final) temperature,
        then z from q(z | S, c); shape (n, N, P). Encoder 1 runs once."""
        h = self.trunk(s)
        logits = self.logits(h).float()
        draws = []
        for _ in range(n):
            c = gumbel_softmax(logits, self.tau, generator)
            mu, logvar = self.encode_given(h, c)
            draws.append(self.decode(mu + torch.exp(0.5 * logvar) * _normal(mu, generator))[0])
        return torch.stack(draws)

    @torch.no_grad()
    def posterior_mean(self, s: torch.Tensor) -> dict:
        """Maps from decoder(mu(S, c)) with c the one-hot of argmax q(y|S) (no Gumbel noise);
        responsibilities are q(y|S) = softmax(logits)."""
        h = self.trunk(s)
        logits = self.logits(h)
        mu, _ = self.encode_given(h, self.deterministic_c(logits))
        return {"params": self.decode(mu)[0], "latent_mean": mu,
                "responsibilities": F.softmax(logits.float(), dim=1)}


def build_network(method: str, model: SignalModel, opts: dict) -> PhysicsNet:
    """The network of ``method`` for ``model`` from resolved options (see hyperparameters.yaml)."""
    width = int(opts.get("hidden_width") or model.n_measurements)
    common = dict(n_hidden=int(opts["n_hidden_layers"]), activation=opts["activation"])
    if method == "ssl":
        return SSLNet(model, width, **common)
    latent = int(opts.get("latent_dim") or model.n_raw)
    if method == "vaeunig":
        return VAEUniG(model, width, latent, **common)
    if method == "vaegmm":
        return VAEGMM(model, width, latent, int(opts["n_components"]),
                      tau=float(opts["tau_start"]), prior_spread=float(opts["prior_spread"]),
                      shared_encoder=bool(opts.get("shared_encoder", True)), **common)
    raise ValueError(f"{method!r} is not a network method; choose from ssl, vaeunig, vaegmm")
