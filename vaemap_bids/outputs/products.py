"""From what a fit or a series computed to the derivatives' content: plain functions.

A :class:`Product` is one row of the derivatives table (:mod:`.table`) with its content: an array
on the image grid (0 outside the brain mask), a text, a dictionary or a set of arrays, and the
sidecar of an image. :func:`fit_products` holds the science that turning estimates into files
needs (the direction frame, hard clusters from responsibilities, the latent subsample);
:func:`write_products` writes a list of products under a root folder, atomically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import write_json_atomic, write_nifti_atomic, write_npz_atomic, write_text_atomic
from ..dataset.gradients import bvec_to_voxel_axes
from ..physics import get_model_class
from . import sidecars
from .table import Output, fit_outputs, output

#: Voxels kept in the ``_latent.npz`` subsample (a seeded random choice among fitted voxels).
LATENT_SUBSAMPLE = 20000


@dataclass
class Product:
    output: Output
    data: object                 # ndarray (image or npz dict of arrays), str (tsv), dict (json)
    sidecar: dict | None = None


def rows_to_volume(rows: np.ndarray, mask: np.ndarray, fill=0) -> np.ndarray:
    """Per-voxel rows (N,) or (N, k) of the mask's voxels (C order) back on the grid: 3-D or
    4-D, ``fill`` outside the mask."""
    rows = np.asarray(rows)
    mask = np.asarray(mask, dtype=bool)
    if rows.shape[0] != int(mask.sum()):
        raise ValueError(f"{rows.shape[0]} rows for a mask of {int(mask.sum())} voxels")
    out = np.full(mask.shape + rows.shape[1:], fill, dtype=rows.dtype)
    out[mask] = rows
    return out


def hard_clusters(responsibilities: np.ndarray) -> np.ndarray:
    """1-based index of the most responsible component per row; 0 where the row was not fitted."""
    resp = np.asarray(responsibilities)
    fitted = np.all(np.isfinite(resp), axis=1)
    labels = np.zeros(len(resp), dtype=np.int16)
    labels[fitted] = np.argmax(resp[fitted], axis=1) + 1
    return labels


def latent_subsample(latent_mean: np.ndarray, mask: np.ndarray, seed: int,
                     responsibilities: np.ndarray | None = None,
                     limit: int = LATENT_SUBSAMPLE) -> dict:
    """A seeded subsample (<= ``limit``) of fitted voxels: ``latent_mean`` (n, L),
    ``responsibilities`` (n, K) when given, ``index`` (n,) = flat C-order voxel index in the 3-D
    grid, and ``shape`` of that grid."""
    fitted = np.flatnonzero(np.all(np.isfinite(latent_mean), axis=1))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(fitted, size=min(limit, fitted.size), replace=False))
    out = {"latent_mean": latent_mean[rows].astype(np.float32),
           "index": np.flatnonzero(np.asarray(mask).ravel())[rows].astype(np.int64),
           "shape": np.array(np.shape(mask), dtype=np.int64)}
    if responsibilities is not None:
        out["responsibilities"] = responsibilities[rows].astype(np.float32)
    return out


def _finite_rows(values: np.ndarray) -> np.ndarray:
    """Rows with a non-finite value (excluded or failed voxels) become 0, the background value."""
    values = np.asarray(values, dtype=np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        values = np.where(bad, np.float32(0), values)
    return values


def fit_products(arrays: dict, record: dict, series: dict, mask: np.ndarray,
                 affine: np.ndarray, sources: list[str]) -> list[Product]:
    """Every product of one (model, method) fit, in the order of
    :func:`~vaemap_bids.outputs.table.fit_outputs` (the fit record last).

    ``arrays`` are the fit node's per-row results (``params``, ``nrmse``, and ``std``,
    ``responsibilities``, ``latent_mean`` where the method has them), one row per brain-mask
    voxel; ``record`` is its fit record (model, method, hyper-parameters, seed, device, counts).
    ``dir`` maps go from the ``.bvec`` frame to the image's voxel axes."""
    model_name, method = record["model"], record["method"]
    model_cls = get_model_class(model_name)
    info = model_cls.describe()
    hyper = record.get("hyperparameters", {})
    common = {"sources": list(sources), "seed": int(record.get("seed", 0)),
              "device": record.get("device", "cpu")}
    params = model_cls.split(arrays["params"])
    std = model_cls.split(arrays["std"]) if "std" in arrays else {}
    specs = {p.label: p for p in model_cls.parameters}
    out_dir_of = {}
    products: list[Product] = []
    for out in fit_outputs(series, model_name, method):
        kind, param = out.kind, out.entities.get("param")
        if kind == "param":
            rows, reference = params[param], None
            if specs[param].is_direction:
                rows, reference = bvec_to_voxel_axes(rows, affine), "ijk"
            data = rows_to_volume(_finite_rows(rows), mask)
            side = sidecars.map_sidecar(info, method, hyper, param,
                                        direction_reference=reference, **common)
        elif kind == "std":
            data = rows_to_volume(_finite_rows(std[param]), mask)
            side = sidecars.map_sidecar(info, method, hyper, param, stat="std",
                                        std_method=record.get("std_method"), **common)
        elif kind == "nrmse":
            data = rows_to_volume(_finite_rows(arrays["nrmse"]), mask)
            side = sidecars.nrmse_sidecar(info, method, hyper,
                                          n_measurements=record.get("n_measurements", 0), **common)
        elif kind == "dseg":
            resp = arrays["responsibilities"]
            data = rows_to_volume(hard_clusters(resp), mask)
            side = sidecars.dseg_sidecar(info, method, hyper, resp.shape[1], probabilistic=False,
                                         **common)
        elif kind == "dseg_tsv":
            data, side = sidecars.dseg_tsv(arrays["responsibilities"].shape[1]), None
        elif kind == "probseg":
            resp = arrays["responsibilities"]
            data = rows_to_volume(_finite_rows(resp), mask)
            side = sidecars.dseg_sidecar(info, method, hyper, resp.shape[1], probabilistic=True,
                                         **common)
        elif kind == "latent":
            data = latent_subsample(arrays["latent_mean"], mask, common["seed"],
                                    arrays.get("responsibilities"))
            side = None
        elif kind == "fit_record":
            data, side = _final_record(record, out_dir_of), None
        else:  # a kind added to the table without a product here
            raise ValueError(f"no product for output kind {kind!r}")
        if side is not None and record.get("denoise", "none") != "none":
            side["Denoising"] = sidecars.denoise_block(record["denoise"])
        out_dir_of.setdefault(kind, {})[param] = out.path
        products.append(Product(out, data, side))
    return products


def _final_record(record: dict, paths: dict) -> dict:
    """The fit record with where its outputs are (relative to OUTPUT_DIR)."""
    one = {k: v[None] for k, v in paths.items() if None in v}
    final = dict(record)
    final["maps"] = dict(paths.get("param", {}))
    final["std_maps"] = dict(paths.get("std", {}))
    for kind in ("nrmse", "dseg", "dseg_tsv", "probseg", "latent"):
        if kind in one:
            final[kind] = one[kind]
    return final


def series_products(series: dict, mask: np.ndarray, valid: np.ndarray, mask_source: str,
                    excluded: dict, sources: list[str]) -> list[Product]:
    """The brain mask used and the validity mask (``valid``: the fitted voxels, 3-D bool)."""
    return [
        Product(output("mask", series), np.asarray(mask, dtype=np.uint8),
                sidecars.mask_sidecar(mask_source, sources)),
        Product(output("valid_mask", series), np.asarray(valid, dtype=np.uint8),
                sidecars.valid_mask_sidecar(excluded, sources)),
    ]


def image_like(data: np.ndarray, reference, dtype) -> nib.Nifti1Image:
    """A NIfTI on the grid of ``reference`` (an image, or a NIfTI header): its affine,
    qform/sform codes and spatial units."""
    data = np.asarray(data, dtype=dtype)
    ref = getattr(reference, "header", reference)
    img = nib.Nifti1Image(data, ref.get_best_affine())
    img.header.set_qform(ref.get_qform(), int(ref["qform_code"]))
    img.header.set_sform(ref.get_sform(), int(ref["sform_code"]))
    img.header.set_xyzt_units(xyz=ref.get_xyzt_units()[0])
    img.set_data_dtype(dtype)
    return img


def write_products(products: list[Product], root, reference) -> list[Path]:
    """Write ``products`` under ``root`` at their table paths (images on the grid of
    ``reference``, an image or a header,
    sidecars beside them), each atomically and in order; returns the paths written."""
    root = Path(root)
    written = []
    for product in products:
        out = product.output
        path = root / out.path
        if out.spec.is_image:
            write_nifti_atomic(path, image_like(product.data, reference, out.spec.dtype))
            written.append(write_json_atomic(root / out.sidecar_path, product.sidecar or {}))
            written.insert(-1, path)
        elif out.spec.extension == ".tsv":
            written.append(write_text_atomic(path, product.data))
        elif out.spec.extension == ".npz":
            written.append(write_npz_atomic(path, **product.data))
        elif out.spec.extension == ".json":
            written.append(write_json_atomic(path, product.data))
        else:
            raise ValueError(f"cannot write {out.path}: unknown extension")
    return written
