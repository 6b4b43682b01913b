"""Shared fixtures: acquisitions built from the HCP table that ships in the package."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vaemap_bids.physics import Acquisition
from vaemap_bids.simulate.acquisitions import hcp_acquisition


@pytest.fixture(scope="session")
def hcp_acq() -> Acquisition:
    return hcp_acquisition()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (the shared CI box has two cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
