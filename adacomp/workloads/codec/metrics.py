"""Rate-distortion metrics: the Bjontegaard delta rate (BD-rate).

G. Bjontegaard, *Calculation of average PSNR differences between RD-curves*, VCEG-M33, 2001:
fit ``log(rate)`` as a cubic polynomial of PSNR for each curve, integrate both fits over the
PSNR range the curves share, and turn the mean difference of log-rates into a percentage:
``BD-rate = exp(mean(log R_test - log R_anchor)) - 1`` (negative: the test curve needs fewer
bits for the same quality).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["bd_psnr", "bd_rate"]


def _fits(anchor_rate, anchor_psnr, test_rate, test_psnr, degree: int, psnr_axis: bool):
    """Polynomial fits (log-rate of PSNR, or PSNR of log-rate) and the shared range of the abscissa."""
    fits, ranges = [], []
    for name, rate, psnr in (("anchor", anchor_rate, anchor_psnr), ("test", test_rate, test_psnr)):
        rate, psnr = np.asarray(rate, dtype=np.float64), np.asarray(psnr, dtype=np.float64)
        if rate.shape != psnr.shape or rate.ndim != 1 or len(rate) < 2:
            raise ValueError(
                f"{name}: need two 1-D arrays of equal length >= 2, got {rate.shape}, {psnr.shape}"
            )
        if not (np.all(rate > 0) and np.all(np.isfinite(rate)) and np.all(np.isfinite(psnr))):
            raise ValueError(f"{name}: rates must be positive and finite, PSNRs finite")
        if len(np.unique(psnr)) < 2:
            raise ValueError(f"{name}: PSNRs must not all be equal")
        if len(np.unique(rate)) < 2:
            raise ValueError(f"{name}: rates must not all be equal")
        x, y = (psnr, np.log(rate)) if psnr_axis else (np.log(rate), psnr)
        fits.append(np.polyfit(x, y, min(degree, len(rate) - 1)))
        ranges.append((float(x.min()), float(x.max())))
    lo, hi = max(ranges[0][0], ranges[1][0]), min(ranges[0][1], ranges[1][1])
    if not hi > lo:
        axis = "PSNR" if psnr_axis else "log-rate"
        raise ValueError(f"the {axis} ranges do not overlap: anchor {ranges[0]}, test {ranges[1]}")
    integrals = [np.polyval(np.polyint(f), hi) - np.polyval(np.polyint(f), lo) for f in fits]
    return (integrals[1] - integrals[0]) / (hi - lo)


def bd_rate(anchor_rate, anchor_psnr, test_rate, test_psnr, degree: int = 3) -> float:
    """BD-rate of the test curve against the anchor, in percent.

    Each curve needs at least two points with distinct PSNRs; with fewer than ``degree + 1``
    points the polynomial degree drops to ``points - 1``. Raises ``ValueError`` when the PSNR
    ranges do not overlap or rates are not positive.
    """
    mean_log_diff = _fits(anchor_rate, anchor_psnr, test_rate, test_psnr, degree, psnr_axis=True)
    return 100.0 * (math.exp(mean_log_diff) - 1.0)


def bd_psnr(anchor_rate, anchor_psnr, test_rate, test_psnr, degree: int = 3) -> float:
    """BD-PSNR: mean PSNR gain (dB) of the test curve at equal rate, over the shared log-rate range
    (PSNR fitted as a cubic of log-rate). Raises ``ValueError`` when the rate ranges do not overlap."""
    return _fits(anchor_rate, anchor_psnr, test_rate, test_psnr, degree, psnr_axis=False)
