"""One trainer for the three network estimators (ssl, vaeunig, vaegmm).

- The whole data set is one tensor on the device; mini-batches are rows picked by a random
  permutation (no DataLoader, no per-row Python work), and losses are summed on the device and
  read once per epoch.
- A held-out fraction of voxels gives a validation loss every epoch; once the KL weight and the
  Gumbel-softmax temperature have reached their final values, the weights with the lowest
  validation loss are kept, the learning rate is halved after every ``lr_decay_patience`` epochs
  without improvement, and training stops after ``patience`` epochs without improvement.
- Seeds are fixed (torch, numpy) and every random draw (split, batch order, Gumbel and Gaussian
  noise) comes from one ``torch.Generator`` on the device: the same seed on the same device gives
  the same maps.
- Maps come from the posterior mean (see ``posterior_mean`` in :mod:`.networks`); VAE methods also
  give a per-voxel posterior standard deviation from ``n_posterior_samples`` draws of z (and, for
  vaegmm, of c at the final temperature), the latent means and, for vaegmm, the responsibilities
  q(y|S). Inference runs in chunks under ``torch.no_grad``.
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
from .networks import ACTIVATIONS, PhysicsNet, build_network
from .options import method_options

log = logging.getLogger("vaemap.fitting.train")


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
    if opts.get("beta") == "auto" and int(opts.get("warmup_epochs", 0)) < 1:
        raise ValueError(f"{method}: beta='auto' needs warmup_epochs >= 1 (the noise variance is "
                         "first estimated during the warm-up)")
    need("warmup_epochs", lambda v: is_int(v) and v >= 0, "an integer >= 0")
    need("ramp_epochs", lambda v: is_int(v) and v >= 0, "an integer >= 0")
    need("n_posterior_samples", lambda v: is_int(v) and (v == 0 or v >= 2), "0 (off) or an integer >= 2")
    need("n_components", lambda v: is_int(v) and v >= 2, "an integer >= 2")
    need("tau_start", lambda v: is_num(v) and v > 0, "a number > 0")
    need("tau_end", lambda v: is_num(v) and v > 0, "a number > 0")
    need("prior_spread", lambda v: is_num(v) and v >= 0, "a number >= 0")
    if "tau_start" in opts and opts["tau_end"] > opts["tau_start"]:
        raise ValueError(f"{method}: tau_end={opts['tau_end']} must not exceed "
                         f"tau_start={opts['tau_start']} (the temperature is annealed down)")


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


def beta_at(epoch: int, opts: dict, noise_variance: float | None = None,
            n_measurements: int | None = None) -> float:
    """KL weight of 0-based ``epoch``: 0 during ``warmup_epochs``, then a linear ramp that reaches
    ``beta`` after ``ramp_epochs`` more epochs, then constant. With ``beta: auto`` the final value
    is :func:`auto_beta` of ``noise_variance`` (0 while there is no estimate yet)."""
    if "beta" not in opts:
        return 0.0
    warm, ramp = int(opts["warmup_epochs"]), int(opts["ramp_epochs"])
    if epoch < warm:
        return 0.0
    if opts["beta"] == "auto":
        if noise_variance is None or n_measurements is None:
            return 0.0
        final = auto_beta(noise_variance, n_measurements)
    else:
        final = float(opts["beta"])
    if ramp == 0:
        return final
    return final * min(1.0, (epoch - warm + 1) / ramp)


def auto_beta(noise_variance: float, n_measurements: int) -> float:
    """The KL weight that makes ``MSE + beta * KL`` the negative ELBO of a Gaussian likelihood
    with noise variance sigma^2, divided by T / (2 sigma^2): beta = 2 sigma^2 / T. The trainer
    uses for sigma^2 the reconstruction MSE of the previous epoch (with sampled z), which is the
    maximum-likelihood noise variance of that ELBO (the "calibrated decoder" of Rybkin et al.
    2021, sigma-VAE): the KL weight follows the noise level of the data, and of the fit, instead
    of being fixed by hand."""
    return 2.0 * float(noise_variance) / int(n_measurements)


def tau_at(epoch: int, opts: dict) -> float:
    """Gumbel-softmax temperature of 0-based ``epoch``: geometric decay from ``tau_start`` to
    ``tau_end`` over the warm-up and ramp epochs, then constant."""
    if "tau_start" not in opts:
        return float("nan")
    start, end = float(opts["tau_start"]), float(opts["tau_end"])
    frac = min(1.0, epoch / max(1, schedule_length(opts) - 1))
    return start * (end / start) ** frac


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


@torch.no_grad()
def validation_loss(net: PhysicsNet, data: torch.Tensor, index: torch.Tensor, beta: float,
                    chunk: int) -> float:
    """Loss on the held-out voxels at the posterior mean (z = mu, noiseless c), so that early
    stopping follows the fit and not the sampling noise."""
    net.eval()
    total, n = 0.0, int(index.numel())
    for start in range(0, n, chunk):
        s = data[index[start:start + chunk]]
        out = net.deterministic_forward(s) if net.is_vae else net(s)
        total += float(net.loss(s, out, beta)["loss"]) * s.shape[0]
    net.train()
    return total / n


def train_network(net: PhysicsNet, data: torch.Tensor, opts: dict, *, generator: torch.Generator,
                  progress: bool = True, desc: str = "") -> dict:
    """Train ``net`` in place on ``data`` (N, T, already on the device) and load its best
    weights. Returns ``{"history", "best_epoch" (1-based; 0 when training ended before the
    schedules settled), "epochs_run", "n_train", "n_validation", "batch_size", "resolved"}``
    (``resolved``: the noise variance and KL weight of the best epoch when ``beta`` is auto)."""
    device = data.device
    train_idx, val_idx = _split(data.shape[0], float(opts["validation_fraction"]), generator, device)
    n_train = int(train_idx.numel())
    batch = resolve_batch_size(opts["batch_size"], n_train)
    chunk = int(opts["inference_batch_size"])
    optimiser = torch.optim.Adam(net.parameters(), lr=float(opts["lr"]),
                                 weight_decay=float(opts.get("weight_decay", 0.0)))
    settled = max(0, schedule_length(opts) - 1)  # first epoch with final beta and tau
    history: dict[str, list[float]] = {k: [] for k in ("loss", "recon", "kl", "beta", "val_loss",
                                                       "lr")}
    if net.method == "vaegmm":
        history["tau"] = []
    best, best_state, best_epoch, waited = math.inf, None, -1, 0
    resolved = {}
    net.train()
    bar = tqdm(range(int(opts["epochs"])), desc=desc, unit="epoch", disable=not progress,
               leave=False)
    noise_var = None  # the previous epoch's reconstruction MSE (for beta: auto)
    for epoch in bar:
        beta = beta_at(epoch, opts, noise_var, data.shape[1])
        tau = tau_at(epoch, opts)
        net.set_temperature(tau)
        order = train_idx[torch.randperm(n_train, generator=generator, device=device)]
        sums = torch.zeros(3, device=device)
        for start in range(0, n_train, batch):
            s = data[order[start:start + batch]]
            out = net(s, generator)
            terms = net.loss(s, out, beta)
            optimiser.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimiser.step()
            sums += torch.stack([terms["loss"], terms["recon"], terms["kl"]]).detach() * s.shape[0]
        loss, recon, kl = (sums / n_train).tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{desc}: training loss became {loss} at epoch {epoch + 1}; "
                                     "lower the learning rate")
        val = validation_loss(net, data, val_idx, beta, chunk) if val_idx.numel() else math.nan
        used_noise_var, noise_var = noise_var, recon
        for key, value in (("loss", loss), ("recon", recon), ("kl", kl), ("beta", beta),
                           ("val_loss", val)):
            history[key].append(value)
        if "tau" in history:
            history["tau"].append(tau)
        history["lr"].append(optimiser.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{loss:.3g}", val=f"{val:.3g}", beta=f"{beta:.2g}")
        if epoch < settled:
            continue
        score = val if math.isfinite(val) else loss
        if score < best:
            best, best_epoch, waited = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if opts.get("beta") == "auto":
                resolved = {"noise_variance": used_noise_var, "beta": beta}
        else:
            waited += 1
            if val_idx.numel() and waited >= int(opts["patience"]):
                break
            # Noisy (mini-batch, and for VAEs sampled) gradients need a shrinking step to settle:
            # halve the learning rate after every lr_decay_patience epochs without improvement.
            decay_every = int(opts.get("lr_decay_patience", 0))
            if decay_every and waited % decay_every == 0:
                for group in optimiser.param_groups:
                    group["lr"] *= float(opts["lr_decay_factor"])
    bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    if "tau_end" in opts:  # inference uses the final temperature even after an early stop
        net.set_temperature(float(opts["tau_end"]))
    net.eval()
    return {"history": history, "best_epoch": best_epoch + 1, "epochs_run": epoch + 1,
            "n_train": n_train, "n_validation": int(val_idx.numel()), "batch_size": batch,
            "resolved": resolved}


# ---- inference -------------------------------------------------------------------------------
@torch.no_grad()
def predict(net: PhysicsNet, data: torch.Tensor, *, chunk: int, n_samples: int = 0,
            generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """Posterior-mean maps of every row of ``data``, in chunks. Returns numpy arrays:
    ``params`` (N, P); for VAEs ``latent_mean`` (N, L) and, when ``n_samples`` >= 2, ``std``
    (N, P) from that many posterior draws; for vaegmm ``responsibilities`` (N, K)."""
    net.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, data.shape[0], chunk):
        s = data[start:start + chunk]
        out = dict(net.posterior_mean(s))
        if net.is_vae and n_samples >= 2:
            out["std"] = net.posterior_samples(s, n_samples, generator).std(dim=0)
        for key, value in out.items():
            parts.setdefault(key, []).append(value.float().cpu().numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def fit_network(model: SignalModel, y: np.ndarray, valid: np.ndarray, method: str, *,
                device: torch.device, seed: int = 0, options: dict | None = None,
                progress: bool = True, sigma=None) -> FitResult:
    """Train the ``method`` network on ``y`` (float32, (n_valid, model.n_measurements),
    b0-normalised signals of the finite voxels) and return full-length maps (NaN where
    ``valid`` is False). ``device`` is already resolved (see :func:`.resolve_device`)."""
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
    with _matmul_precision(device, bool(opts.get("allow_tf32", False))):
        net = build_network(method, model, opts).to(device)
        data = torch.as_tensor(np.ascontiguousarray(y, dtype=np.float32)).to(device)
        info = train_network(net, data, opts, generator=generator, progress=progress,
                             desc=f"{model.name}/{method}")
        t1 = time.perf_counter()
        sampler = torch.Generator(device=device).manual_seed(seed + 1)
        out = predict(net, data, chunk=int(opts["inference_batch_size"]),
                      n_samples=int(opts.get("n_posterior_samples", 0)), generator=sampler)
    t2 = time.perf_counter()
    hyper = dict(opts)
    hyper.update(hidden_width=int(opts.get("hidden_width") or model.n_measurements),
                 latent_dim=(int(opts.get("latent_dim") or model.n_raw)
                             if "latent_dim" in opts else None),
                 best_epoch=info["best_epoch"], epochs_run=info["epochs_run"],
                 n_train=info["n_train"], n_validation=info["n_validation"],
                 batch_size_used=info["batch_size"])
    if "beta" in info["resolved"]:
        hyper.update(beta_used=info["resolved"]["beta"],
                     noise_variance_estimate=info["resolved"]["noise_variance"])
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
        device=str(device), seed=int(seed))
