"""Deep Image Prior dipole inversion: a small seeded 3-D convolutional network, trained on one
subject, maps a fixed input to chi so that the dipole model of its output matches the measured
local field inside the brain; its architecture and early stopping are the regulariser.

* Input: a fixed tensor made once from the seed (``input: noise``: Gaussian noise channels;
  ``field``: the normalised local field; ``both``: the field and noise channels).
* Output: chi on the brain's bounding box (plus a margin), multiplied by the mask; the forward
  model is the zero-padded FFT dipole convolution of :mod:`.dipole`, in torch.
* Loss: the mean squared error between the modelled and the measured local field over the
  training voxels of the mask.
* Early stopping (``stopping``): ``holdout`` (default) keeps a seeded random fraction of the
  mask voxels out of the loss and returns the output at the iteration with the lowest held-out
  error (evaluated every ``eval_every`` iterations, stopping after ``patience`` evaluations
  without improvement); ``discrepancy`` stops at the first iteration whose mean squared
  residual reaches ``tau`` times the field's noise variance (Morozov's discrepancy principle),
  the noise taken from the multi-echo fit.
* Deterministic: seeded weights and input, deterministic cuDNN, transposed convolutions (not
  interpolation, whose CUDA backward is not deterministic). Same seed and device, same map.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .dipole import dipole_kernel, padded_shape


def _bbox(mask: np.ndarray, margin: int, multiple: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    out = []
    for a in range(3):
        size = hi[a] - lo[a]
        size = int(np.ceil(size / multiple) * multiple)
        start = int(max(0, min(lo[a], mask.shape[a] - size)))
        out.append(slice(start, start + size))
    return tuple(out)


class _Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1), nn.GroupNorm(min(4, cout), cout),
            nn.LeakyReLU(0.2),
            nn.Conv3d(cout, cout, 3, padding=1), nn.GroupNorm(min(4, cout), cout),
            nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.body(x)


class DipNet(nn.Module):
    """A two-level 3-D U-Net (``width``, ``2 width``, ``4 width`` channels)."""

    def __init__(self, in_channels: int, width: int = 16):
        super().__init__()
        w = int(width)
        self.enc0 = _Block(in_channels, w)
        self.down1 = nn.Conv3d(w, 2 * w, 2, stride=2)
        self.enc1 = _Block(2 * w, 2 * w)
        self.down2 = nn.Conv3d(2 * w, 4 * w, 2, stride=2)
        self.mid = _Block(4 * w, 4 * w)
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, stride=2)
        self.dec1 = _Block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose3d(2 * w, w, 2, stride=2)
        self.dec0 = _Block(2 * w, w)
        self.out = nn.Conv3d(w, 1, 1)

    def forward(self, x):
        e0 = self.enc0(x)
        e1 = self.enc1(self.down1(e0))
        m = self.mid(self.down2(e1))
        d1 = self.dec1(torch.cat([self.up2(m), e1], 1))
        d0 = self.dec0(torch.cat([self.up1(d1), e0], 1))
        return self.out(d0)[:, 0]


def dip_invert(local_field: np.ndarray, mask: np.ndarray, affine, *, seed: int = 0,
               device: str | torch.device = "cpu", max_iter: int = 2000, lr: float = 1e-3,
               width: int = 16, input: str = "both", noise_channels: int = 4,
               input_noise_std: float = 1.0, stopping: str = "holdout",
               holdout_fraction: float = 0.1, eval_every: int = 10, patience: int = 20,
               tau: float = 1.0, noise_ppm: float | None = None, pad: float = 0.5,
               d0: float = 0.0, margin: int = 4, progress=None) -> tuple[np.ndarray, dict]:
    """Deep Image Prior inversion; returns ``(chi_ppm, record)`` with chi referenced to the mask
    mean and 0 outside it, and ``record`` holding the training curve (iteration, training and
    held-out losses, in ppm^2) and where it stopped."""
    from ..fitting.base import resolve_device
    from .inversion import reference

    if stopping not in ("holdout", "discrepancy"):
        raise ValueError(f"unknown DIP stopping rule {stopping!r}; use holdout or discrepancy")
    if stopping == "discrepancy" and not noise_ppm:
        raise ValueError("the discrepancy principle needs the field's noise level (noise_ppm)")
    if input not in ("noise", "field", "both"):
        raise ValueError(f"unknown DIP input {input!r}; use noise, field or both")
    dev = resolve_device(device)
    m = mask.astype(bool)
    box = _bbox(m, margin, 4)
    mb = m[box]
    fb = np.where(m, local_field, 0.0)[box]
    scale = float(np.std(fb[mb])) or 1.0
    shape = mb.shape
    big = padded_shape(shape, pad)
    kern = dipole_kernel(big, affine, d0=d0)

    torch.manual_seed(int(seed))
    gen = np.random.default_rng(int(seed))
    det_state = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        chans = []
        if input in ("field", "both"):
            chans.append(fb / scale)
        if input in ("noise", "both"):
            chans.extend(gen.standard_normal((int(noise_channels),) + shape) * input_noise_std)
        z = torch.as_tensor(np.stack(chans)[None], dtype=torch.float32, device=dev)
        net = DipNet(z.shape[1], width).to(dev)
        train = mb.copy()
        hold = np.zeros_like(mb)
        if stopping == "holdout" and holdout_fraction > 0:
            pick = gen.random(mb.shape) < holdout_fraction
            hold = mb & pick
            train = mb & ~pick
        t_train = torch.as_tensor(train, device=dev)
        t_hold = torch.as_tensor(hold, device=dev)
        t_mask = torch.as_tensor(mb, dtype=torch.float32, device=dev)
        t_f = torch.as_tensor(fb / scale, dtype=torch.float32, device=dev)
        t_d = torch.as_tensor(kern, dtype=torch.float32, device=dev)
        crop = tuple(slice(0, n) for n in shape)

        def model_field(chi):
            padded = torch.zeros(big, dtype=torch.float32, device=dev)
            padded[crop] = chi
            return torch.fft.ifftn(t_d * torch.fft.fftn(padded)).real[crop]

        opt = torch.optim.Adam(net.parameters(), lr=lr)
        curve = {"iteration": [], "train_loss": [], "holdout_loss": []}
        best, best_loss, best_it, bad = None, np.inf, 0, 0
        target = None
        if stopping == "discrepancy":
            target = tau * (float(noise_ppm) / scale) ** 2
        t0 = time.perf_counter()
        stopped = "max_iter"
        for it in range(1, int(max_iter) + 1):
            opt.zero_grad(set_to_none=True)
            chi = net(z)[0] * t_mask
            resid = model_field(chi) - t_f
            loss = (resid[t_train] ** 2).mean()
            loss.backward()
            opt.step()
            if it % eval_every == 0 or it == max_iter:
                with torch.no_grad():
                    chi = net(z)[0] * t_mask
                    resid = model_field(chi) - t_f
                    tl = float((resid[t_train] ** 2).mean())
                    hl = float((resid[t_hold] ** 2).mean()) if hold.any() else float("nan")
                curve["iteration"].append(it)
                curve["train_loss"].append(tl * scale ** 2)
                curve["holdout_loss"].append(hl * scale ** 2)
                if progress is not None:
                    progress(it, tl * scale ** 2, hl * scale ** 2)
                if stopping == "holdout" and hold.any():
                    if hl < best_loss:
                        best_loss, best_it, bad = hl, it, 0
                        best = chi.detach().cpu().numpy()
                    else:
                        bad += 1
                        if bad >= patience:
                            stopped = "holdout"
                            break
                else:
                    best, best_it = chi.detach().cpu().numpy(), it
                    if target is not None and tl <= target:
                        stopped = "discrepancy"
                        break
        seconds = time.perf_counter() - t0
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = det_state
    chi_full = np.zeros(m.shape)
    chi_full[box] = best * scale
    record = {"curve": curve, "best_iteration": int(best_it), "stopped_by": stopped,
              "iterations_run": int(curve["iteration"][-1]) if curve["iteration"] else 0,
              "seconds": seconds, "device": str(dev), "field_scale_ppm": scale,
              "box": [[s.start, s.stop] for s in box]}
    return reference(chi_full, m), record


__all__ = ["DipNet", "dip_invert"]
