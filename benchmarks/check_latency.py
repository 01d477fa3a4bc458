"""Wall time of `policyc check` on standard-library policies, as a user runs it (a fresh process).

Usage: python benchmarks/check_latency.py [--runs 20] [POLICY_FILE ...]
Prints the median, min and max wall time per file; the issue's target is < 0.3 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = [ROOT / "policies" / "mustdrop.tokpol", ROOT / "policies" / "pyramiddrop_snapkv.tokpol"]
    parser.add_argument("files", nargs="*", type=Path, default=defaults)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    script = shutil.which("policyc", path=str(Path(sys.executable).parent)) or shutil.which("policyc")
    if script is None:
        sys.exit("policyc is not installed in this environment")
    subprocess.run([script, "check", "-q", str(args.files[0])], check=True)  # warm the grammar cache
    print(f"{'file':40} {'median':>8} {'min':>8} {'max':>8}   ({args.runs} runs, {script})")
    for path in args.files:
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([script, "check", "-q", str(path)], check=True)
            times.append(time.perf_counter() - start)
        print(f"{path.name:40} {statistics.median(times):8.3f} {min(times):8.3f} {max(times):8.3f}")


if __name__ == "__main__":
    main()
