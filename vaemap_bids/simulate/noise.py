"""Rician noise on magnitude MR signals.

A magnitude image is |S + n_re + i n_im| with independent Gaussian n_re, n_im of standard
deviation sigma in both channels. On a signal normalised so that S0 = 1, ``sigma = 1 / SNR``.
"""
from __future__ import annotations

import numpy as np


def as_generator(rng) -> np.random.Generator:
    """``rng`` as a NumPy Generator (an int seed, a SeedSequence, None or a Generator)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def rician_sigma(snr: float) -> float:
    """Noise standard deviation of each channel for a normalised signal (S0 = 1)."""
    snr = float(snr)
    if not snr > 0:  # also rejects NaN
        raise ValueError(f"SNR must be positive, got {snr}")
    return 0.0 if np.isinf(snr) else 1.0 / snr


def add_rician_noise(signal, snr: float, rng=None) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of sigma = 1 / ``snr`` per channel.

    ``signal`` is any real array (any shape) normalised so that S0 = 1; ``snr = inf`` returns a
    float64 copy without noise. The real and imaginary draws come from ``rng`` in that order, so
    a fixed seed gives the same noise, and at different SNRs the noise is the same draw scaled
    (common random numbers across SNRs).
    """
    signal = np.asarray(signal, dtype=np.float64)
    if not np.all(np.isfinite(signal)):
        raise ValueError("signal to add noise to contains NaN or infinite values")
    sigma = rician_sigma(snr)
    gen = as_generator(rng)
    real = gen.standard_normal(signal.shape)
    imag = gen.standard_normal(signal.shape)
    if sigma == 0.0:
        return signal.copy()
    return np.hypot(signal + sigma * real, sigma * imag)
