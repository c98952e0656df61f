"""Memory and time of decoding + preprocessing extreme images, printed as JSON.

Each case runs in a child process whose address space may grow by at most ``--limit-mb`` beyond what it holds after
importing qscorer (what ``ulimit -v`` does), so that a path that pads an extreme shape to its square fails with
MemoryError instead of exhausting the machine. Per case and path: peak RSS above the child's baseline (``VmHWM``,
reset after the imports), wall time and outcome. Paths, side by side:

- ``qscorer``: ``load_image`` + ``process_images`` (extreme shapes are resized without their padded square);
- ``original``: ``load_image``, then the original's ``expand2square`` on the whole image and PIL's resize to 448.

Goal: the 1 x 100000 PNG costs at most 200 MB above the baseline on the qscorer path.

    python benchmarks/hostile_images.py [--cases column_1x100000 row_30000x1] [--paths qscorer] [--limit-mb 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CASES = {
    "column_1x100000": (1, 100000),
    "row_100000x1": (100000, 1),
    "row_30000x1": (30000, 1),
    "column_1x10000": (1, 10000),
    "panorama_8000x1000": (8000, 1000),
    "photo_1024x768": (1024, 768),
}
"""(width, height) of each case: lines are 8-bit grey ramps saved as PNG (a few hundred bytes), the others random
RGB pixels saved as JPEG."""

CHILD = """
import json, resource, sys, time

def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024

from qscorer.model.image_processing import expand2square, load_image, process_images, resize_shortest_edge

path, which, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize:") + limit, hard))
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets the peak (VmHWM) to the current RSS
except OSError:
    pass
baseline = status("VmRSS:")
start = time.perf_counter()
try:
    image = load_image(path)
    if which == "qscorer":
        process_images(image)
    else:
        resize_shortest_edge(expand2square(image))
    outcome = "ok"
except Exception as error:
    outcome = f"{type(error).__name__}: {error}"[:160]
print(json.dumps({"peak_rss_above_baseline_mb": round((status("VmHWM:") - baseline) / 2**20, 1),
                  "seconds": round(time.perf_counter() - start, 3), "outcome": outcome}))
"""


def write_case(folder: Path, name: str) -> Path:
    """The image file of a case."""
    width, height = CASES[name]
    if min(width, height) == 1:
        path = folder / f"{name}.png"
        Image.fromarray((np.arange(width * height) % 256).astype(np.uint8).reshape(height, width)).save(path)
    else:
        path = folder / f"{name}.jpg"
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return path


def measure(path: Path, which: str, limit_mb: int) -> dict:
    """One child process: decode + preprocess ``path`` on path ``which`` under the address-space limit."""
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), which, str(limit_mb << 20)], capture_output=True,
                           text=True, timeout=600)
    if child.returncode != 0:
        return {"outcome": f"child exited with {child.returncode}: {child.stderr.strip()[-160:]}"}
    return json.loads(child.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--paths", nargs="+", choices=["qscorer", "original"], default=["qscorer", "original"])
    parser.add_argument("--limit-mb", type=int, default=2048, help="address space each child may add (default 2048)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.cases:
            path = write_case(Path(folder), name)
            results[name] = {"file_bytes": path.stat().st_size,
                             **{which: measure(path, which, args.limit_mb) for which in args.paths}}
    print(json.dumps({"limit_mb": args.limit_mb, "load_average": os.getloadavg(), "cases": results}, indent=1))


if __name__ == "__main__":
    main()
