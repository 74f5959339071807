"""Resampling benchmark: libsoxr (`trimodal.audio.resample`) against the previous hand-written Kaiser-windowed sinc
resampler (`previous_resample` in tests/unit/test_audio.py), one table.

For each input rate: the SNR of soxr's output against the previous one's on the test's band-limited sweep, noise
and speech-like signal, on full-band white noise (which differs by design in the top 7-12% of the band, where the
previous filter rolled off early and let some aliasing through), and each resampler's time for a 30 s clip.

    python bench/resample.py
    python bench/resample.py --seconds 120 --repeat 5
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from trimodal.audio import SAMPLE_RATE, resample

TESTS = Path(__file__).resolve().parents[1] / "tests" / "unit" / "test_audio.py"


def load_reference():
    """The test module that holds `previous_resample`, `reference_signals` and `snr_db`."""
    spec = importlib.util.spec_from_file_location("audio_reference", TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_seconds(fn, repeat: int) -> float:
    """The fastest of `repeat` runs of `fn()`."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length for the timings")
    parser.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the previous resampler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = load_reference()
    print(f"SNR of soxr against the previous resampler (dB); time for a {args.seconds:g} s clip (best of "
          f"{args.repeat}, torch threads {args.threads})")
    print(f"{'rate':>7} {'sweep':>6} {'noise':>6} {'speech':>6} {'white':>6} {'previous':>9} {'soxr':>8} {'x':>6}")
    for rate in ref.COMMON_RATES:
        snrs = [ref.snr_db(ref.previous_resample(x, rate), resample(x, rate))
                for x in ref.reference_signals(rate).values()]
        white = (0.3 * np.random.default_rng(0).standard_normal(int(rate * 2))).astype(np.float32)
        snrs.append(ref.snr_db(ref.previous_resample(white, rate), resample(white, rate)))
        clip = (0.3 * np.random.default_rng(1).standard_normal(int(rate * args.seconds))).astype(np.float32)
        old = best_seconds(lambda: ref.previous_resample(clip, rate, SAMPLE_RATE), args.repeat)
        new = best_seconds(lambda: resample(clip, rate, SAMPLE_RATE), args.repeat)
        print(f"{rate:>7} " + " ".join(f"{s:6.1f}" for s in snrs) + f" {old * 1e3:7.1f}ms {new * 1e3:6.1f}ms "
              f"{old / new:5.1f}x")


if __name__ == "__main__":
    main()
