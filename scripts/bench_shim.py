"""The gemv shim's quantized products alone, against the shim of another commit, in one run.

    python scripts/bench_shim.py --against a7255bf            # the float32 kernel before the integer one
    python scripts/bench_shim.py --against HEAD~1 --rows 1 8 --shapes 2048x8192

Both sources (this checkout's `mlxserve/gemv_shim.c` and the other commit's, from git) are compiled
with the same flags into a small driver that registers one random 4- or 8-bit weight (groups of 32),
multiplies it by `rows` input rows on one thread (the calling thread; no helpers), about 2e9
multiply-adds per timing, and prints the best of 7 timings. Rounds alternate the two builds; the
table has the median over rounds, in billions of multiply-adds a second, and the ratio (above 1.0x
this checkout is faster). The weight is the same for both and small enough to stay in L3, so this
measures the kernels, not memory: end-to-end rates are scripts/bench.py's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
#include SHIM
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
  int n = atoi(argv[1]), k = atoi(argv[2]), bits = atoi(argv[3]), rows = atoi(argv[4]), group = 32;
  uint8_t *q = malloc((size_t)n * k * bits / 8);
  float *s = malloc(sizeof(float) * n * (k / group)), *b = malloc(sizeof(float) * n * (k / group));
  float *dense = malloc(64), *x = malloc(sizeof(float) * k * rows), *y = malloc(sizeof(float) * n * rows);
  srand(1);
  for (long i = 0; i < (long)n * k * bits / 8; i++) q[i] = rand();
  for (long i = 0; i < (long)n * (k / group); i++) { s[i] = (rand() % 1000) * 1e-5f; b[i] = -(rand() % 1000) * 1e-5f; }
  for (long i = 0; i < (long)k * rows; i++) x[i] = (rand() % 2000 - 1000) * 1e-3f;
  if (mlxserve_register_quantized(dense, n, k, group, bits, q, s, b) != 0) return 1;
  int reps = (int)(2e9 / ((double)n * k * rows)) + 1;
  double best = 1e9;
  for (int r = 0; r < 7; r++) {
    double t = now();
    for (int i = 0; i < reps; i++) cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, rows, n, k, 1.f, x, k, dense, k, 0.f, y, n);
    t = (now() - t) / reps;
    if (t < best) best = t;
  }
  printf("%.9f\n", best);
  return 0;
}
"""


def build(source: Path, driver: Path, out: Path) -> Path:
    subprocess.run(["cc", "-O3", "-march=native", f'-DSHIM="{source}"', str(driver), "-o", str(out), "-ldl",
                    "-lpthread", "-lm"], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the commit whose shim to compare with")
    parser.add_argument("--shapes", nargs="+", default=["1536x576", "576x1536", "2048x8192"],
                        help="weights as ROWSxCOLUMNS (output by input width)")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 32], help="input rows per product")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        driver = work / "driver.c"
        driver.write_text(DRIVER)
        other = work / "other.c"
        other.write_text(subprocess.run(["git", "show", f"{args.against}:mlxserve/gemv_shim.c"], cwd=ROOT,
                                        capture_output=True, text=True, check=True).stdout)
        builds = {"this": build(ROOT / "mlxserve" / "gemv_shim.c", driver, work / "this"),
                  args.against: build(other, driver, work / "other")}
        print(f"| weight, {args.bits}-bit | rows | this checkout, GMAC/s | {args.against}, GMAC/s | ratio |")
        print("|---|---:|---:|---:|---:|")
        for shape in args.shapes:
            n, k = (int(v) for v in shape.split("x"))
            for rows in args.rows:
                times: dict[str, list[float]] = {name: [] for name in builds}
                for round_ in range(args.rounds):
                    order = list(builds) if round_ % 2 == 0 else list(reversed(builds))
                    for name in order:
                        run = subprocess.run([str(builds[name]), str(n), str(k), str(args.bits), str(rows)],
                                             capture_output=True, text=True, check=True)
                        times[name].append(float(run.stdout))
                rate = {name: n * k * rows / statistics.median(t) / 1e9 for name, t in times.items()}
                print(f"| {shape} | {rows} | {rate['this']:.1f} | {rate[args.against]:.1f} | "
                      f"{rate['this'] / rate[args.against]:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
