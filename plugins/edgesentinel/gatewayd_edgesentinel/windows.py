"""Window statistics of raw waveforms (vibration, acoustics, current): the spec's
TelemetryWindow `stats` (rms, max, std, band power), computed on the gateway.

Vectorised over a batch: the waveforms of one metric, rate and length are one 2-D
array, and every statistic is one numpy/scipy call along its rows (scipy's Welch
estimate for the power spectral density). CPU work: call it through
`trio.to_thread.run_sync`, never on the trio thread. numpy and scipy are imported on
first use: scipy.signal alone takes seconds to import on a small board, and every
`gatewayd` command loads the plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def band_name(low: float, high: float) -> str:
    """`"10-100"`: the key of a band's power in `stats.bandpower` (Hz, `[low, high)`)."""
    return f"{low:g}-{high:g}"


def window_stats(
    waveforms: Sequence[tuple[float, str, float, Sequence[float]]],
    bands_hz: dict[str, list[list[float]]],
    nperseg: int = 256,
) -> list[dict[str, Any]]:
    """The stats of each `(ts, metric, rate_hz, samples)`, in order: `{"rms", "max", "std",
    "bandpower": {"10-100": ...}, "rate_hz", "samples"}`. `max` is the largest absolute
    sample; band power is the integral of the Welch PSD over `[low, high)` (units²), over
    the metric's configured bands or, without any, the whole band up to Nyquist."""
    import numpy as np
    from scipy.signal import welch

    out: list[dict[str, Any]] = [{} for _ in waveforms]
    groups: dict[tuple[str, float, int], list[int]] = {}
    for i, (_, metric, rate, samples) in enumerate(waveforms):
        groups.setdefault((metric, rate, len(samples)), []).append(i)
    for (metric, rate, n), rows in groups.items():
        x = np.asarray([waveforms[i][3] for i in rows], dtype=np.float64)
        rms = np.sqrt(np.mean(x * x, axis=1))
        peak = np.max(np.abs(x), axis=1)
        std = np.std(x, axis=1)
        freqs, psd = welch(x, fs=rate, nperseg=min(nperseg, n), axis=1)
        df = freqs[1] - freqs[0]
        powers = {}
        for low, high in bands_hz.get(metric) or [[0.0, rate / 2]]:
            # [low, high); the whole band (no bands configured) includes Nyquist itself.
            mask = (freqs >= low) & ((freqs < high) if metric in bands_hz else (freqs <= high))
            powers[band_name(low, high)] = psd[:, mask].sum(axis=1) * df
        for j, i in enumerate(rows):
            out[i] = {"rms": float(rms[j]), "max": float(peak[j]), "std": float(std[j]),
                      "bandpower": {name: float(p[j]) for name, p in powers.items()},
                      "rate_hz": rate, "samples": n}
    return out


def pack(samples: Sequence[float]) -> bytes:
    """A raw waveform as stored locally: little-endian float32 (4 bytes a sample)."""
    import numpy as np

    return np.asarray(samples, dtype="<f4").tobytes()


def unpack(blob: bytes) -> list[float]:
    import numpy as np

    return [float(v) for v in np.frombuffer(blob, dtype="<f4")]
