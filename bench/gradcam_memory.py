"""Grad-CAM's memory: a transfer model at 512 px, explained in one pass against
`explain.GRADCAM_BATCH` images at a time.

    uv run python bench/gradcam_memory.py

Each case runs in a fresh process (an untrained efficientnet_lite0 at input_size 512 on real
digits, as evaluate draws `evaluate.gradcam_images` of them) and prints its time and the
process's peak resident memory (VmHWM). One pass over 64 images, the most the param allows,
is left out: it needs about 25 GiB.
"""

from __future__ import annotations

import subprocess
import sys

CASE = """
import sys, time, torch
from cnnpipe import engine, explain, networks
from cnnpipe.sources import load_source
images, at_a_time = int(sys.argv[1]), int(sys.argv[2])
explain.GRADCAM_BATCH = at_a_time
torch.manual_seed(0)
model = networks.build("efficientnet_lite0", num_classes=10, image_size=28, input_size=512)
digits = load_source("builtin:digits", 28)
norm = engine.Normalisation(*networks.normalisation("efficientnet_lite0"))
started = time.perf_counter()
explain.gradcam(model, digits.images[:images], digits.labels[:images], norm)
seconds = time.perf_counter() - started
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(seconds, int(peak.split()[1]) * 1024)
"""
CASES = [(16, 16), (16, 8), (64, 8)]  # (images, at a time): one pass, then the default


def main() -> None:
    print("| images | at a time | seconds | peak resident memory |\n|---:|---:|---:|---:|")
    for images, at_a_time in CASES:
        out = subprocess.run(
            [sys.executable, "-c", CASE, str(images), str(at_a_time)],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        seconds, peak = float(out[-2]), int(out[-1])
        print(f"| {images} | {at_a_time} | {seconds:.1f} | {peak / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
