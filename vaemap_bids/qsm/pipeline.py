"""The QSM steps as plain functions (the Nipype nodes of :mod:`vaemap_bids.workflows.qsm` call
these): brain mask -> local field (unwrap, multi-echo fit, background removal) -> inversions."""
from __future__ import annotations

import time

import numpy as np

from . import field as F
from .inversion import reference, tkd, tv_admm
from .options import qsm_options


def brain_mask(magnitude: np.ndarray, given: np.ndarray | None = None,
               erode: int = 1) -> tuple[np.ndarray, str]:
    """The given mask (binarised), else one from the magnitude (:func:`field.magnitude_mask`)."""
    if given is not None:
        mask = np.asarray(given) > 0
        if not mask.any():
            raise ValueError("the given brain mask is empty")
        return mask, "given"
    return F.magnitude_mask(magnitude, erode=erode), \
        f"Otsu threshold of the root-sum-of-squares magnitude, largest component, {erode} eroded"


def local_field(magnitude, phase_rad, echo_times_s, b0_tesla, affine, mask,
                options: dict | None = None) -> dict:
    """``{"total": ppm, "sigma": ppm, "local": ppm, "mask": final mask, "seconds": ...}``."""
    opts = (options or qsm_options())["qsm"]
    zooms = tuple(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    t0 = time.perf_counter()
    total, sigma = F.multi_echo_field(magnitude, phase_rad, echo_times_s, b0_tesla, mask, zooms,
                                      unwrap=opts["unwrap"])
    if opts["background"] == "pdf":
        weight = 1.0 / np.maximum(sigma, 1e-12)
        weight = weight / weight[mask].mean()
        local, final = F.pdf(total, mask, affine, weight=weight, max_iter=opts["pdf_max_iter"],
                             pad=opts["pad"], d0=opts["d0"])
    else:
        local, final = F.vsharp(total, mask, zooms, radii_mm=opts["vsharp_radii_mm"],
                                threshold=opts["vsharp_threshold"])
    return {"total": np.where(mask, total, 0.0), "sigma": np.where(mask, sigma, 0.0),
            "local": np.where(final, local, 0.0), "mask": final,
            "seconds": time.perf_counter() - t0}


def invert(method: str, local: np.ndarray, mask: np.ndarray, affine, sigma=None,
           options: dict | None = None, seed: int = 0, device="cpu",
           progress=None) -> tuple[np.ndarray, dict]:
    """chi (ppm, referenced to the mask mean, 0 outside) by ``method`` and a record of the run
    (``hyperparameters``, ``seconds``, and for DIP its training curve)."""
    opts = options or qsm_options()
    common = {"pad": opts["qsm"]["pad"], "d0": opts["qsm"]["d0"]}
    hyper = dict(opts[method])
    t0 = time.perf_counter()
    record: dict = {"method": method, "hyperparameters": hyper}
    if method == "tkd":
        chi = tkd(local, mask, affine, threshold=hyper["threshold"], **common)
    elif method == "tv":
        weight = None
        if hyper["noise_weights"] and sigma is not None:
            weight = 1.0 / np.maximum(sigma, 1e-12)
            weight = weight / weight[mask].mean()
        history: list = []
        chi = tv_admm(local, mask, affine, lam=hyper["lam"], rho=hyper["rho"], mu=hyper["mu"],
                      weight=weight, max_iter=hyper["max_iter"], tol=hyper["tol"],
                      history=history, **common)
        record["iterations"] = len(history)
    elif method == "dip":
        from .dip import dip_invert
        noise = None
        if sigma is not None:
            noise = float(np.sqrt(np.mean(np.asarray(sigma)[mask] ** 2)))
        kw = {k: hyper[k] for k in ("max_iter", "lr", "width", "input", "noise_channels",
                                    "input_noise_std", "stopping", "holdout_fraction",
                                    "eval_every", "patience", "tau", "margin")}
        chi, dip_record = dip_invert(local, mask, affine, seed=seed, device=device,
                                     noise_ppm=noise, progress=progress, **kw, **common)
        record.update(dip_record)
    else:
        raise ValueError(f"unknown QSM method {method!r}")
    record["seconds"] = time.perf_counter() - t0
    return reference(chi, mask), record


__all__ = ["brain_mask", "local_field", "invert"]
