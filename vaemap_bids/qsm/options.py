"""QSM options: packaged defaults (``data/qsm.yaml``) with the user's ``--config`` blocks."""
from __future__ import annotations

import copy
from functools import lru_cache
from importlib.resources import files

import yaml

#: --methods of the QSM family, in their order in outputs and reports.
QSM_METHODS = ("tkd", "tv", "dip")
QSM_BLOCKS = ("qsm",) + QSM_METHODS
_CHOICES = {("qsm", "unwrap"): ("laplacian", "skimage"), ("qsm", "background"): ("pdf", "vsharp"),
            ("dip", "input"): ("noise", "field", "both"),
            ("dip", "stopping"): ("holdout", "discrepancy")}
_POSITIVE = {("tkd", "threshold"), ("tv", "lam"), ("tv", "mu"), ("tv", "max_iter"),
             ("dip", "max_iter"), ("dip", "lr"), ("dip", "width"), ("dip", "eval_every"),
             ("dip", "patience"), ("qsm", "pdf_max_iter")}


@lru_cache(maxsize=1)
def _defaults() -> dict:
    return yaml.safe_load((files("vaemap_bids") / "data" / "qsm.yaml").read_text())


def qsm_options(overrides: dict | None = None) -> dict:
    """``{block: {option: value}}`` for the blocks ``qsm``, ``tkd``, ``tv``, ``dip``: the
    defaults updated with ``overrides`` (a ``--config`` mapping; other blocks are ignored).
    ValueError on an unknown option or a bad value."""
    opts = copy.deepcopy(_defaults())
    for block in QSM_BLOCKS:
        for key, value in ((overrides or {}).get(block) or {}).items():
            if key not in opts[block]:
                raise ValueError(f"unknown option {key!r} for {block!r}; known: "
                                 f"{', '.join(sorted(opts[block]))}")
            opts[block][key] = value
    for (block, key), choices in _CHOICES.items():
        if opts[block][key] not in choices:
            raise ValueError(f"{block}.{key} must be one of {', '.join(choices)}, not "
                             f"{opts[block][key]!r}")
    for block, key in _POSITIVE:
        value = opts[block][key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{block}.{key} must be a positive number, not {value!r}")
    frac = opts["dip"]["holdout_fraction"]
    if not 0 <= frac < 0.5:
        raise ValueError(f"dip.holdout_fraction must be in [0, 0.5), not {frac!r}")
    return opts


__all__ = ["QSM_METHODS", "QSM_BLOCKS", "qsm_options"]
