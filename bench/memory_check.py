"""The memory check before training: its cost, and its estimate against a real step.

    uv run python bench/memory_check.py

For each network and input size: the median time of `engine.step_bytes_per_image` (5 runs,
after one warm-up), the bytes it says a training step takes per image, and what a real step
takes per image: the peak resident memory (VmHWM) of a fresh process that builds the
network and takes one training step of n images, against one of 2n images, with n sized to
need about 1 GiB by the estimate. The estimate is within a few percent of the real figure,
above or below; the check refuses only beyond `engine.MEMORY_MARGIN` of the memory left.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from cnnpipe import engine, networks

CASES = [("small_cnn", None), ("efficientnet_lite0", 56), ("efficientnet_lite0", 224),
         ("efficientnet_lite0", 512), ("resnet18", 512)]  # fmt: skip
IMAGE_SIZE = 28

# A real training step in a fresh process: the process's peak resident memory (VmHWM: ru_maxrss
# would start from this process's, inherited across fork and exec), in bytes.
REAL_STEP = """
import json, sys, torch
from pathlib import Path
from cnnpipe import networks
name, input_size, images = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
extra = {"input_size": input_size} if input_size else {}
model = networks.build(name, num_classes=10, image_size=28, **extra).train()
model = model.to(memory_format=torch.channels_last)
optimizer = torch.optim.AdamW(model.parameters())
batch = torch.randn(images, 3, 28, 28).contiguous(memory_format=torch.channels_last)
model(batch).logsumexp(1).sum().backward()
optimizer.step()
print(int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024)
"""


def digit_inputs() -> engine.ImageInputs:
    digits = load_digits()
    gray = (digits.images[:8] * 255 / 16).astype(np.uint8)
    images = np.stack([np.kron(image, np.ones((4, 4), np.uint8))[:IMAGE_SIZE, :IMAGE_SIZE]
                       for image in gray])  # fmt: skip
    rgb = np.ascontiguousarray(np.repeat(images[..., None], 3, axis=-1))
    norm = engine.Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return engine.ImageInputs(rgb, digits.target[:8], norm, torch.device("cpu"))


def real_step_peak(name: str, input_size: int | None, images: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", REAL_STEP, name, json.dumps(input_size), str(images)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(done.stdout.split()[-1])


def main() -> None:
    inputs = digit_inputs()
    print(f"{'network':<20} {'input':>5} {'check (ms)':>10} {'estimate':>10} {'real step':>10}")
    for name, input_size in CASES:
        extra = {"input_size": input_size} if input_size else {}
        model = networks.build(name, num_classes=10, image_size=IMAGE_SIZE, **extra)
        engine.step_bytes_per_image(model, inputs)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            estimate = engine.step_bytes_per_image(model, inputs)
            times.append(time.perf_counter() - started)
        n = max(4, (1 << 30) // max(estimate, 1))
        peaks = [real_step_peak(name, input_size, images) for images in (n, 2 * n)]
        real = (peaks[1] - peaks[0]) / n
        print(
            f"{name:<20} {input_size or IMAGE_SIZE:>5} {statistics.median(times) * 1000:>10.0f} "
            f"{estimate / 2**20:>7.1f} MiB {real / 2**20:>6.1f} MiB"
        )


if __name__ == "__main__":
    main()
