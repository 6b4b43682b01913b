"""Method defaults from ``data/hyperparameters.yaml`` merged with user overrides."""
from __future__ import annotations

import copy
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import yaml

from .base import METHODS


@lru_cache(maxsize=1)
def _defaults() -> dict:
    text = (files("vaemap_bids") / "data" / "hyperparameters.yaml").read_text()
    return yaml.safe_load(text)


def default_options(method: str, model: str | None = None) -> dict:
    """The packaged defaults of ``method`` (with its ``method@model`` block applied)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    table = _defaults()
    opts = copy.deepcopy(table.get(method, {}))
    if model is not None:
        opts.update(copy.deepcopy(table.get(f"{method}@{model}", {})))
    return opts


def method_options(method: str, overrides: dict | None = None, model: str | None = None) -> dict:
    """Defaults of ``method`` updated with ``overrides``; an unknown key raises ValueError."""
    opts = default_options(method, model)
    for key, value in (overrides or {}).items():
        if key not in opts:
            raise ValueError(f"unknown option {key!r} for method {method!r}; "
                             f"known: {', '.join(sorted(opts))}")
        opts[key] = value
    return opts


def load_config(path: str | Path) -> dict:
    """Read a ``--config`` YAML file: ``{method or method@model: {option: value}}``, checked
    against the defaults so that a typo fails before any work starts."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read hyper-parameter file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of method -> options")
    from ..qsm.options import QSM_BLOCKS, qsm_options
    for block, opts in data.items():
        if block in QSM_BLOCKS:   # QSM: checked as one set (vaemap_bids/data/qsm.yaml)
            try:
                qsm_options({block: opts})
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
            continue
        method, _, model = str(block).partition("@")
        if not isinstance(opts, dict):
            raise ValueError(f"{path}: block {block!r} must be a mapping of option: value")
        try:
            method_options(method, opts, model or None)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return data


def check_options(method: str, model: str, overrides: dict | None = None) -> dict:
    """Resolve and range-check the options of ``method`` on ``model`` without fitting anything
    (so a command line can reject a bad value before any work starts); raises ValueError.
    Every method's ``noise_model``/``n_coils`` are checked here
    (:func:`vaemap_bids.physics.noise.check_noise_options`)."""
    if method == "lsq":
        from .lsq import resolve_options
        return resolve_options(model, overrides)
    from .train import check_options as check_network_options
    opts = method_options(method, overrides, model)
    if method == "svae":
        from .spatial import check_options as check_spatial_options
        check_spatial_options(opts)
        return opts
    check_network_options(method, opts)
    check_noise(method, opts)
    return opts


def check_noise(method: str, opts: dict) -> None:
    """The noise-model options of ``method`` (when it has them); raises ValueError."""
    from ..physics.noise import check_noise_options

    if "noise_model" in opts or "n_coils" in opts:
        try:
            check_noise_options(opts.get("noise_model", "rician"), opts.get("n_coils", 1))
        except ValueError as exc:
            raise ValueError(f"{method}: {exc}") from None


def options_for(config: dict | None, method: str, model: str) -> dict:
    """Resolved options of ``method`` on ``model`` given a loaded ``--config`` mapping."""
    config = config or {}
    merged = dict(config.get(method, {}))
    merged.update(config.get(f"{method}@{model}", {}))
    return method_options(method, merged, model)
