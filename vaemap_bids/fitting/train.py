"""One trainer for the three network estimators (ssl, vaeunig, vaegmm).

- The whole data set is one tensor on the device; mini-batches are rows picked by a random
  permutation (no DataLoader, no per-row Python work), and losses are summed on the device and
  read once per epoch.
- A held-out fraction of voxels gives a validation loss every epoch; once the KL weight has
  reached its final value, the weights with the lowest validation loss are kept, the learning
  rate is halved after every ``lr_decay_patience`` epochs without improvement, and training stops
  after ``patience`` epochs without improvement.
- The reconstruction term is the noise model's NLL (``noise_model``, ``n_coils``) with the noise
  level sigma of the b0-normalised signals: given by the caller (a scalar or one per voxel), or
  one scalar learnt with the network (recorded in ``hyperparameters['noise']``).
- Seeds are fixed (torch, numpy) and every random draw (split, batch order, Gaussian noise,
  Monte-Carlo nodes) comes from a ``torch.Generator`` on the device: the same seed on the same
  device gives the same maps.
- Maps are posterior means of the squashed parameters and ``std`` their posterior standard
  deviation (see ``posterior`` in :mod:`.networks`), optionally after ``refine_steps``
  Levenberg-Marquardt steps to the MAP with a Laplace posterior there; VAE methods also give the
  latent means and, for vaegmm, the responsibilities q(y|S). Inference runs in chunks under
  ``torch.no_grad``. ``FitResult.predict`` runs the trained network on new voxels.
- On CUDA, matrix products may use TF32 (option ``allow_tf32``); on CPU all arithmetic is float32.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from ..physics.base import SignalModel
from .base import NETWORK_METHODS, FitResult, scatter_rows
from .networks import (ACTIVATIONS, COVARIANCES, NOISE_MODELS, PhysicsNet, build_network,
                       empirical_bayes_prior, posterior_nodes)
from .options import method_options
from .subsample import resolve_train_voxels, stratified_subsample

log = logging.getLogger("vaemap.fitting.train")
#: voxels refined together (memory: K x L x T Jacobian entries per voxel)
REFINE_CHUNK = 8192


# ---- options and schedules -------------------------------------------------------------------
def check_options(method: str, opts: dict) -> None:
    """Raise ValueError naming the first option that is out of range."""
    def need(key, ok, what):
        if key in opts and not ok(opts[key]):
            raise ValueError(f"{method}: option {key}={opts[key]!r} must be {what}")

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
            and math.isfinite(v)

    need("epochs", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("batch_size", lambda v: v == "auto" or (is_int(v) and v >= 1), "'auto' or an integer >= 1")
    need("inference_batch_size", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("lr", lambda v: is_num(v) and v > 0, "a number > 0")
    need("weight_decay", lambda v: is_num(v) and v >= 0, "a number >= 0")
    need("validation_fraction", lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)")
    need("patience", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("lr_decay_patience", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)")
    need("lr_decay_factor", lambda v: is_num(v) and 0 < v < 1, "a number in (0, 1)")
    need("hidden_width", lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1")
    need("n_hidden_layers", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("activation", lambda v: v in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}")
    need("allow_tf32", lambda v: isinstance(v, bool), "true or false")
    need("shared_encoder", lambda v: isinstance(v, bool), "true or false")
    need("latent_dim", lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1")
    need("beta", lambda v: v == "auto" or (is_num(v) and v >= 0), "'auto' or a number >= 0")
    need("warmup_epochs", lambda v: is_int(v) and v >= 0, "an integer >= 0")
    need("ramp_epochs", lambda v: is_int(v) and v >= 0, "an integer >= 0")
    need("n_posterior_samples", lambda v: is_int(v) and v >= 2, "an integer >= 2")
    need("n_components", lambda v: is_int(v) and v >= 2, "an integer >= 2")
    need("prior_spread", lambda v: is_num(v) and v >= 0, "a number >= 0")
    need("noise_model", lambda v: v in NOISE_MODELS, f"one of {list(NOISE_MODELS)}")
    need("n_coils", lambda v: is_int(v) and v >= 1, "an integer >= 1")
    need("fit_amplitude", lambda v: isinstance(v, bool), "true or false")
    need("posterior_covariance", lambda v: v in COVARIANCES, f"one of {list(COVARIANCES)}")
    need("refine_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)")
    need("prior_em_iterations", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)")
    need("train_voxels", lambda v: v is None or (is_int(v) and v >= 100),
         "null (every voxel) or an integer >= 100")
    need("prior_em_voxels", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = all)")


#: ``batch_size: auto`` gives about this many Adam steps per epoch, within AUTO_BATCH_RANGE: small
#: data sets (a 10k-voxel simulation) keep enough steps per epoch to converge in tens of epochs,
#: and a whole brain (~1M voxels) gets the large batches that keep a GPU busy.
AUTO_STEPS_PER_EPOCH = 64
AUTO_BATCH_RANGE = (256, 8192)


def resolve_batch_size(batch_size, n_train: int) -> int:
    """Voxels per step for ``n_train`` training voxels (``"auto"`` or an integer)."""
    if batch_size == "auto":
        lo, hi = AUTO_BATCH_RANGE
        batch_size = min(hi, max(lo, n_train // AUTO_STEPS_PER_EPOCH))
    return max(1, min(int(batch_size), n_train))


def schedule_length(opts: dict) -> int:
    """Epochs until the KL weight and the temperature reach their final values."""
    return int(opts.get("warmup_epochs", 0)) + int(opts.get("ramp_epochs", 0))


def beta_at(epoch: int, opts: dict) -> float:
    """KL weight of 0-based ``epoch``: 0 during ``warmup_epochs``, then a linear ramp that reaches
    ``beta`` after ``ramp_epochs`` more epochs, then constant. ``beta: auto`` is 1: the loss is
    then the negative ELBO of the noise model's likelihood (the reconstruction term is a proper
    NLL summed over volumes, so no hand-set weight is needed)."""
    if "beta" not in opts:
        return 0.0
    warm, ramp = int(opts["warmup_epochs"]), int(opts["ramp_epochs"])
    if epoch < warm:
        return 0.0
    final = 1.0 if opts["beta"] == "auto" else float(opts["beta"])
    if ramp == 0:
        return final
    return final * min(1.0, (epoch - warm + 1) / ramp)


@contextmanager
def _matmul_precision(device: torch.device, allow_tf32: bool):
    """TF32 matrix products on CUDA only, restoring the global setting afterwards."""
    if device.type != "cuda" or not allow_tf32:
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ---- training --------------------------------------------------------------------------------
def _split(n: int, fraction: float, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=generator, device=device)
    n_val = int(round(fraction * n))
    if n - n_val < 1:
        raise ValueError(f"{n} voxels are too few to hold out a validation fraction of {fraction}")
    return perm[n_val:], perm[:n_val]


def _rows(sigma: torch.Tensor | None, index: torch.Tensor):
    """The per-voxel sigma (N, 1) of the rows ``index`` (None: the network's learnt scalar)."""
    return None if sigma is None else sigma[index]


@torch.no_grad()
def validation_loss(net: PhysicsNet, data: torch.Tensor, index: torch.Tensor, beta: float,
                    chunk: int, sigma: torch.Tensor | None = None) -> float:
    """Loss on the held-out voxels at the posterior mean (z = mu), so that early stopping follows
    the fit and not the sampling noise."""
    net.eval()
    total, n = 0.0, int(index.numel())
    for start in range(0, n, chunk):
        rows = index[start:start + chunk]
        s = data[rows]
        out = net.deterministic_forward(s)
        total += float(net.loss(s, out, beta, _rows(sigma, rows))["loss"]) * s.shape[0]
    net.train()
    return total / n


def train_network(net: PhysicsNet, data: torch.Tensor, opts: dict, *, generator: torch.Generator,
                  progress: bool = True, desc: str = "", sigma: torch.Tensor | None = None) -> dict:
    """Train ``net`` in place on ``data`` (N, T, already on the device) and load its best
    weights. ``sigma`` (N, 1) is the noise level of every row; None trains the network's scalar
    ``log_noise`` with the rest (otherwise it is frozen). Returns ``{"history", "best_epoch"
    (1-based; 0 when training ended before the schedules settled), "epochs_run", "n_train",
    "n_validation", "batch_size"}``."""
    device = data.device
    train_idx, val_idx = _split(data.shape[0], float(opts["validation_fraction"]), generator, device)
    n_train = int(train_idx.numel())
    batch = resolve_batch_size(opts["batch_size"], n_train)
    chunk = int(opts["inference_batch_size"])
    net.log_noise.requires_grad_(sigma is None)
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad],
                                 lr=float(opts["lr"]),
                                 weight_decay=float(opts.get("weight_decay", 0.0)))
    settled = max(0, schedule_length(opts) - 1)  # first epoch with the final beta
    history: dict[str, list[float]] = {k: [] for k in ("loss", "recon", "kl", "beta", "val_loss",
                                                       "lr", "sigma")}
    stopper = EarlyStopping(opts, optimiser, bool(val_idx.numel()))
    net.train()
    bar = tqdm(range(int(opts["epochs"])), desc=desc, unit="epoch", disable=not progress,
               leave=False)
    for epoch in bar:
        beta = beta_at(epoch, opts)
        order = train_idx[torch.randperm(n_train, generator=generator, device=device)]
        sums = torch.zeros(3, device=device)
        for start in range(0, n_train, batch):
            rows = order[start:start + batch]
            s = data[rows]
            out = net(s, generator)
            terms = net.loss(s, out, beta, _rows(sigma, rows))
            optimiser.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimiser.step()
            sums += torch.stack([terms["loss"], terms["recon"], terms["kl"]]).detach() * s.shape[0]
        loss, recon, kl = (sums / n_train).tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: training loss became {loss} at epoch {epoch + 1}; "
                                     "lower the learning rate")
        val = (validation_loss(net, data, val_idx, beta, chunk, sigma) if val_idx.numel()
               else math.nan)
        noise = float(net.log_noise.detach().exp()) if sigma is None else math.nan
        for key, value in (("loss", loss), ("recon", recon), ("kl", kl), ("beta", beta),
                           ("val_loss", val), ("sigma", noise)):
            history[key].append(value)
        history["lr"].append(optimiser.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{loss:.3g}", val=f"{val:.3g}", beta=f"{beta:.2g}")
        if epoch < settled:
            continue
        if stopper.update(net, epoch, val if math.isfinite(val) else loss):
            break
    bar.close()
    stopper.restore(net)
    net.eval()
    return {"history": history, "best_epoch": stopper.best_epoch + 1, "epochs_run": epoch + 1,
            "n_train": n_train, "n_validation": int(val_idx.numel()), "batch_size": batch}


class EarlyStopping:
    """The best weights so far (on the validation loss, else the training loss), stopping after
    ``patience`` epochs without improvement (only with held-out voxels), and the learning-rate
    decay: noisy (mini-batch, and for VAEs sampled) gradients need a shrinking step to settle, so
    the rate is multiplied by ``lr_decay_factor`` every ``lr_decay_patience`` epochs without
    improvement."""

    def __init__(self, opts: dict, optimiser: torch.optim.Optimizer, has_validation: bool):
        self.patience = int(opts["patience"])
        self.decay_every = int(opts.get("lr_decay_patience", 0))
        self.decay_factor = float(opts.get("lr_decay_factor", 0.5))
        self.optimiser, self.has_validation = optimiser, has_validation
        self.best, self.best_epoch, self.waited, self.state = math.inf, -1, 0, None

    def update(self, net: torch.nn.Module, epoch: int, score: float) -> bool:
        """Record ``epoch``'s score; True when training should stop."""
        if score < self.best:
            self.best, self.best_epoch, self.waited = score, epoch, 0
            self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            return False
        self.waited += 1
        if self.has_validation and self.waited >= self.patience:
            return True
        if self.decay_every and self.waited % self.decay_every == 0:
            for group in self.optimiser.param_groups:
                group["lr"] *= self.decay_factor
        return False

    def restore(self, net: torch.nn.Module) -> None:
        """Load the best weights into ``net`` (when any epoch was scored)."""
        if self.state is not None:
            net.load_state_dict(self.state)


# ---- inference -------------------------------------------------------------------------------
@torch.no_grad()
def predict(net: PhysicsNet, data: torch.Tensor, *, chunk: int, n_samples: int = 64,
            generator: torch.Generator | None = None, sigma: torch.Tensor | None = None,
            refine_steps: int = 0) -> dict[str, np.ndarray]:
    """Posterior summaries of every row of ``data``, in chunks. Returns numpy arrays: ``params``
    (N, P), the posterior means of the squashed parameters (ssl: its point estimate); for VAEs
    ``std`` (N, P), their posterior standard deviations, and ``latent_mean`` (N, L); for vaegmm
    ``responsibilities`` (N, K). The expectations use :func:`posterior_nodes` (``n_samples``
    points, the same for every voxel); ``refine_steps`` > 0 refines q first (Laplace at the MAP).
    ``sigma`` (N, 1) is the noise level of every row (None: the network's learnt scalar)."""
    net.eval()
    kwargs = {}
    if net.is_vae and refine_steps:
        chunk = min(chunk, REFINE_CHUNK)  # the Jacobians of K components x L directions
    if net.is_vae:
        nodes, weights = posterior_nodes(net.latent_dim, int(n_samples), generator, data.device)
        kwargs = {"nodes": nodes, "node_weights": weights, "refine_steps": int(refine_steps)}
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, data.shape[0], chunk):
        s = data[start:start + chunk]
        sig = None if sigma is None else sigma[start:start + chunk]
        out = net.posterior(s, sigma=sig, **kwargs)
        for key, value in out.items():
            parts.setdefault(key, []).append(value.float().cpu().numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def sigma_tensor(sigma, n: int, device) -> torch.Tensor:
    """A scalar or one value per row -> a (n, 1) float32 tensor; raises ValueError when sigma is
    not finite and positive or has the wrong length."""
    arr = np.asarray(sigma, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    arr = arr.reshape(-1)
    if arr.size != n:
        raise ValueError(f"sigma must be a scalar or one value per voxel ({n}), got {arr.size}")
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError("sigma must be finite and > 0 in every voxel")
    return torch.as_tensor(arr, dtype=torch.float32, device=device).reshape(n, 1)


def initial_sigma(model: SignalModel, y: np.ndarray) -> tuple[float, str]:
    """A starting value for the learnt noise level: the median over voxels of the spread (ddof 1)
    of the repeated b0 volumes of the b0-normalised signals (sigma / S0 of a voxel when the b0
    SNR is high), or 0.05 when the model's volumes have fewer than 2 b0."""
    b0 = np.asarray(model.acquisition.b0_mask, dtype=bool)
    if b0.sum() >= 2:
        spread = np.std(y[:, b0], axis=1, ddof=1)
        spread = spread[np.isfinite(spread) & (spread > 0)]
        if spread.size:
            return float(np.median(spread)), f"median spread of the {int(b0.sum())} b0 volumes"
    return 0.05, "fixed 0.05 (fewer than 2 b0 volumes)"


def make_predictor(net: PhysicsNet, model: SignalModel, opts: dict, device: torch.device,
                   default_sigma, seed: int):
    """The in-memory ``predict(signals, sigma=None) -> (params, std)`` of a trained network:
    ``signals`` are b0-normalised (N, T) rows (the model's volumes or its full acquisition),
    ``sigma`` a scalar or one value per row (None: ``default_sigma``, the fit's learnt or median
    given noise level). Rows with non-finite signals are NaN; ``std`` is None for ssl. Nothing is
    retrained; the sigma matters where the posterior is refined (``refine_steps``)."""
    from .base import prepare_signals

    def predict_new(signals, sigma=None):
        y, valid = prepare_signals(model, signals)
        sig = default_sigma if sigma is None else sigma
        arr = np.asarray(sig, dtype=np.float64)
        if arr.ndim and arr.size == valid.size:
            arr = arr.reshape(-1)[valid]
        with _matmul_precision(device, bool(opts.get("allow_tf32", False))):
            data = torch.as_tensor(y).to(device)
            out = predict(net, data, chunk=int(opts["inference_batch_size"]),
                          n_samples=int(opts.get("n_posterior_samples", 64)),
                          generator=torch.Generator(device=device).manual_seed(seed + 1),
                          sigma=sigma_tensor(arr, len(y), device),
                          refine_steps=int(opts.get("refine_steps", 0)))
        std = scatter_rows(out["std"], valid) if "std" in out else None
        return scatter_rows(out["params"], valid), std

    return predict_new


def fit_network(model: SignalModel, y: np.ndarray, valid: np.ndarray, method: str, *,
                device: torch.device, seed: int = 0, options: dict | None = None,
                progress: bool = True, sigma=None) -> FitResult:
    """Train the ``method`` network on ``y`` (float32, (n_valid, model.n_measurements),
    b0-normalised signals of the finite voxels) and return full-length maps (NaN where
    ``valid`` is False). ``device`` is already resolved (see :func:`.resolve_device`).
    ``sigma`` is the noise standard deviation of the b0-normalised signals (sigma / S0): a scalar
    or one value per row of ``y``; None learns one scalar with the network (maximum of the
    ELBO), started from :func:`initial_sigma`. ``hyperparameters['noise']`` records which."""
    if method not in NETWORK_METHODS:
        raise ValueError(f"{method!r} is not a network method; choose from {list(NETWORK_METHODS)}")
    opts = method_options(method, options, model.name)
    check_options(method, opts)
    y = np.asarray(y)
    valid = np.asarray(valid, dtype=bool)
    if y.ndim != 2 or y.shape[1] != model.n_measurements:
        raise ValueError(f"y must have shape (voxels, {model.n_measurements}), got {y.shape}")
    if int(valid.sum()) != y.shape[0]:
        raise ValueError(f"valid marks {int(valid.sum())} voxels but y has {y.shape[0]} rows")
    if not np.all(np.isfinite(y)):
        raise ValueError("y has non-finite values; pass the finite rows only (prepare_signals)")
    device = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    generator = torch.Generator(device=device).manual_seed(seed)
    sigma_t = None if sigma is None else sigma_tensor(sigma, y.shape[0], device)
    if sigma is None:
        sigma_init, init_source = initial_sigma(model, y)
    else:
        sigma_init, init_source = float(sigma_t.median()), "the given sigma (median)"
    # amortised: train on a stratified subsample (fitting/subsample.py), infer every voxel
    n_train = resolve_train_voxels(opts.get("train_voxels"), y.shape[0])
    rows = stratified_subsample(y, n_train, seed) if n_train < y.shape[0] else None
    with _matmul_precision(device, bool(opts.get("allow_tf32", False))):
        net = build_network(method, model, opts, sigma_init=sigma_init).to(device)
        data = torch.as_tensor(np.ascontiguousarray(y, dtype=np.float32)).to(device)
        if rows is None:
            train_data, train_sigma = data, sigma_t
        else:
            picked = torch.as_tensor(rows, device=device)
            train_data = data[picked]
            train_sigma = None if sigma_t is None else sigma_t[picked]
        info = train_network(net, train_data, opts, generator=generator, progress=progress,
                             desc=f"{model.name}/{method}", sigma=train_sigma)
        t1 = time.perf_counter()
        refine = int(opts.get("refine_steps", 0))
        n_em = int(opts.get("prior_em_iterations", 0))
        if net.is_vae and refine and n_em:
            # the prior has few parameters: a random subset of voxels estimates it as well as
            # all of them, and bounds the EM's cost on a whole brain
            n_sub = int(opts.get("prior_em_voxels", 0)) or train_data.shape[0]
            em_rows = torch.randperm(train_data.shape[0], generator=torch.Generator(
                device=device).manual_seed(seed + 2), device=device)[:n_sub]
            sig_em = net.noise_sigma(None if train_sigma is None else train_sigma[em_rows])
            net.refined_prior = empirical_bayes_prior(
                net, train_data[em_rows], sig_em, n_iter=n_em, n_steps=refine,
                chunk=min(int(opts["inference_batch_size"]), REFINE_CHUNK))
        sampler = torch.Generator(device=device).manual_seed(seed + 1)
        out = predict(net, data, chunk=int(opts["inference_batch_size"]),
                      n_samples=int(opts.get("n_posterior_samples", 64)), generator=sampler,
                      sigma=sigma_t, refine_steps=int(opts.get("refine_steps", 0)))
    t2 = time.perf_counter()
    hyper = dict(opts)
    hyper.update(hidden_width=int(opts.get("hidden_width") or model.n_measurements),
                 latent_dim=getattr(net, "latent_dim", None),
                 best_epoch=info["best_epoch"], epochs_run=info["epochs_run"],
                 n_train=info["n_train"], n_validation=info["n_validation"],
                 n_train_voxels=n_train,
                 batch_size_used=info["batch_size"])
    learnt = float(net.log_noise.detach().exp())
    if sigma is None:
        noise = {"sigma_source": "learnt", "sigma": learnt, "sigma_init": sigma_init,
                 "sigma_init_source": init_source,
                 "how": "one scalar noise level of the b0-normalised signals, trained with the "
                        "network as a parameter of the ELBO (the maximum-likelihood noise level "
                        "of the fit)"}
        default_sigma = learnt
    else:
        given = sigma_t.cpu().numpy().reshape(-1)
        noise = {"sigma_source": "given", "sigma": float(np.median(given)),
                 "sigma_min": float(given.min()), "sigma_max": float(given.max()),
                 "per_voxel": bool(np.ndim(sigma) > 0),
                 "how": "noise level of the b0-normalised signals given by the caller"}
        default_sigma = float(np.median(given))
    noise.update(model=opts.get("noise_model", "rician"),
                 n_coils=int(opts.get("n_coils", 1)) if opts.get("noise_model") == "ncchi" else 1)
    hyper["noise"] = noise
    hist = info["history"]
    log.info("%s/%s: %d epochs (best %d, val loss %.4g) on %s in %.1f s", model.name, method,
             info["epochs_run"], info["best_epoch"],
             min((v for v in hist["val_loss"] if math.isfinite(v)), default=math.nan),
             device, t2 - t0)
    return FitResult(
        model=model.name, method=method,
        params=scatter_rows(out["params"], valid), valid=valid,
        std=scatter_rows(out["std"], valid) if "std" in out else None,
        responsibilities=(scatter_rows(out["responsibilities"], valid)
                          if "responsibilities" in out else None),
        latent_mean=scatter_rows(out["latent_mean"], valid) if "latent_mean" in out else None,
        history=hist, hyperparameters=hyper,
        timings={"fit_seconds": t2 - t0, "voxels_per_second": y.shape[0] / max(t2 - t0, 1e-9),
                 "train_seconds": t1 - t0, "predict_seconds": t2 - t1,
                 "voxel_epochs_per_second": info["n_train"] * info["epochs_run"] / max(t1 - t0, 1e-9)},
        device=str(device), seed=int(seed),
        predict=make_predictor(net, model, opts, device, default_sigma, int(seed)))
