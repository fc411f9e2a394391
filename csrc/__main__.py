"""``python -m erpo_fast.csrc``: build the C++/CUDA ops now (for this machine's GPU), e.g. in an image or a job's
set-up step, so a run's first use does not compile. Prints where the build went; exits 1 if it failed."""

import sys
import time

from . import cache_dir, load_ops

if __name__ == "__main__":
    t0 = time.perf_counter()
    try:
        load_ops(verbose="-v" in sys.argv)
    except RuntimeError as exc:
        print(f"erpo_fast: build failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"erpo_fast: ops ready in {cache_dir()} ({time.perf_counter() - t0:.1f} s)")
