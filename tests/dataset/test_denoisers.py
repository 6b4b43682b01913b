"""The dipy denoisers: on pure noise they invent no structure; a real pattern they keep."""
from __future__ import annotations

import numpy as np
import pytest

from vaemap_bids.dataset.denoise import DENOISERS, denoise, denoise_mppca

SHAPE = (12, 12, 12)
N_B0, N_DWI = 3, 27


def _series(amplitude: float, seed: int = 0):
    """A flat object (signal 100) with Gaussian noise of sd 10 in every voxel and volume, plus
    ``amplitude`` times a hidden rank-1 pattern: a smooth spatial map times a random +-1 profile
    across the diffusion-weighted volumes."""
    rng = np.random.default_rng(seed)
    bvals = np.r_[np.zeros(N_B0), np.full(N_DWI, 1000.0)]
    noise = 100.0 + 10.0 * rng.standard_normal((*SHAPE, N_B0 + N_DWI))
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    spatial = np.sin(3 * x + 1) * np.cos(2 * y) + 0.5 * z
    spatial = (spatial - spatial.mean()) / spatial.std()
    profile = np.r_[np.zeros(N_B0), rng.choice([-1.0, 1.0], N_DWI)]
    pattern = spatial[..., None] * profile
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    return noise + amplitude * pattern, bvals, mask, pattern


def _corr(a, b, mask):
    a = a[mask][:, N_B0:].ravel()
    b = b[mask][:, N_B0:].ravel()
    return float(np.corrcoef(a - a.mean(), b)[0, 1])


@pytest.mark.parametrize("method", ["mppca", "patch2self"])
def test_pure_noise_leaves_no_structure(method):
    data, bvals, mask, pattern = _series(0.0)
    out, extra = denoise(data, bvals, mask, method)
    assert out.shape == data.shape and out.dtype == np.float32
    # no correlation with the pattern that is not in the data ...
    assert abs(_corr(out, pattern, mask)) < 0.05   # raw series with the pattern: 0.27
    # ... and the same measure does see that pattern once it is there, below the noise (the
    # test can fail): the denoiser keeps it, raising its correlation above the raw series'
    real, *_ = _series(3.0)
    den, _ = denoise(real, bvals, mask, method)
    raw_r, den_r = _corr(real, pattern, mask), _corr(den, pattern, mask)
    assert raw_r > 0.2 and den_r > raw_r
    # noise is removed inside the mask, and the background is left as it was
    assert np.std(out[mask]) < 0.9 * np.std(data[mask])
    np.testing.assert_array_equal(out[~mask], data[~mask].astype(np.float32))
    if method == "mppca":
        assert np.median(extra["sigma"][mask]) == pytest.approx(10.0, rel=0.2)
        assert np.all(extra["sigma"][~mask] == 0)


def test_none_and_errors():
    data, bvals, mask, _ = _series(0.0)
    same, extra = denoise(data, bvals, mask, "none")
    np.testing.assert_array_equal(same, data.astype(np.float32))
    assert extra == {} and DENOISERS == ("none", "mppca", "patch2self")
    with pytest.raises(ValueError, match="unknown denoiser"):
        denoise(data, bvals, mask, "nlmeans")
    with pytest.raises(ValueError, match="4-D"):
        denoise(data[..., 0], bvals, mask, "mppca")
    with pytest.raises(ValueError, match="patch"):
        denoise_mppca(data, mask, patch_radius=1)   # 27 voxels for 30 volumes
