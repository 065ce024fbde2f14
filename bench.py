"""Benchmarks: speed and memory of each part against an independent reference, measured in one run.

    python bench.py ot        # Sinkhorn vs POT and vs the exp-domain form (DESIGN.md §2.1)
    python bench.py data      # augmentation pipelines vs a plain PIL + torchvision reference
    python bench.py quality   # GLCM / compression ratio vs scikit-image

Ratios, not absolute times, are the targets: both sides run on the same machine in the same process.
Nothing here is a test; tests never time anything.
"""
import argparse
import sys
import time


def median_time(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


BENCHES = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=sorted(BENCHES), help="which benchmark to run")
    args, rest = parser.parse_known_args()
    BENCHES[args.which](rest)


if __name__ == "__main__":
    sys.exit(main())
