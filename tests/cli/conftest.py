"""Phantom datasets that the command-line tests break on purpose: ``base`` is written once per
module (its ``PHANTOM`` gives the shape and seed), ``ds`` is a fresh copy per test."""
from __future__ import annotations

import shutil

import pytest

from vaemap_bids.simulate.phantom import write_phantom_dataset


@pytest.fixture(scope="module")
def base(request, tmp_path_factory):
    settings = getattr(request.module, "PHANTOM", {"shape": (10, 12, 9), "seed": 0})
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    write_phantom_dataset(root / "bids", root / "truth", model="msdki", **settings)
    return root


@pytest.fixture
def ds(base, tmp_path):
    """A copy of the phantom (``bids/``, ``truth/``) that a test may break."""
    for part in ("bids", "truth"):
        shutil.copytree(base / part, tmp_path / part)
    return tmp_path
