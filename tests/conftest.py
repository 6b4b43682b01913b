"""Shared fixtures: acquisitions built from the HCP table that ships in the package."""
from __future__ import annotations

import numpy as np
import pytest

from vaemap_bids.physics import Acquisition
from vaemap_bids.simulate.acquisitions import hcp_acquisition


@pytest.fixture(scope="session")
def hcp_acq() -> Acquisition:
    return hcp_acquisition()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
