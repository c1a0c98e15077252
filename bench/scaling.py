"""Scaling benchmark: prepare (and one training epoch) on synthetic image folders.

    uv run python bench/scaling.py --sizes 1000 10000 100000

writes one folder per size (PNG and JPEG files of varied sizes, a few classes; kept between
runs), then in a scratch directory per size runs `cnnpipe prepare`, `cnnpipe augment` (no
copies) and one epoch of `cnnpipe train`, each as a child process, and prints per stage the
wall time, images per second and memory. prepare runs `--repeats` times per size: the table
shows the median time and the highest memory peak.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MIB = 1 << 20

CLASSES = ("circle", "square", "triangle", "cross")
SIDE_RANGE = (48, 160)
COMPLETE = ".complete"


def synthetic_image(index: int) -> tuple[str, Image.Image]:
    """Image `index`: its class (index mod 4) drawn as a shape on a plain background, at a
    random width and height. Deterministic in `index`."""
    rng = np.random.default_rng(index)
    name = CLASSES[index % len(CLASSES)]
    width, height = rng.integers(*SIDE_RANGE, endpoint=True, size=2).tolist()
    background, colour = (tuple(rng.integers(0, 256, 3).tolist()) for _ in range(2))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    half = int(side * rng.uniform(0.25, 0.45))
    cx, cy = width // 2 + rng.integers(-side // 8, side // 8 + 1), height // 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "square":
        draw.rectangle(box, fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], colour)
    else:
        draw.rectangle((cx - half, cy - half // 4, cx + half, cy + half // 4), fill=colour)
        draw.rectangle((cx - half // 4, cy - half, cx + half // 4, cy + half), fill=colour)
    return name, image


def _write_images(folder: Path, indices: range) -> None:
    for index in indices:
        name, image = synthetic_image(index)
        suffix = "png" if index % 2 == 0 else "jpg"
        image.save(folder / name / f"{index:07d}.{suffix}")


def write_folder(folder: Path, size: int, workers: int) -> Path:
    """`size` synthetic images in `folder/<class>/`, written once and reused afterwards."""
    if (folder / COMPLETE).exists():
        return folder
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    step = 1000
    with ProcessPoolExecutor(workers) as pool:
        jobs = [
            pool.submit(_write_images, folder, range(start, min(start + step, size)))
            for start in range(0, size, step)
        ]
        for job in jobs:
            job.result()
    (folder / COMPLETE).touch()
    return folder


@dataclass
class Measured:
    seconds: float  # wall time of the whole `cnnpipe <stage>` process, start-up included
    peak_process_mib: float  # the kernel's peak RSS of its largest process (stage or worker)
    peak_tree_mib: float  # the largest sum of RSS over the stage and its workers (sampled)
    peak_tree_anon_mib: float  # the same without file-backed pages (memory-mapped splits)
    output: str


def _tree_rss(process: psutil.Process) -> tuple[int, int]:
    """(RSS, RSS less file-backed and shared pages) summed over `process` and its children."""
    total = anonymous = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            memory = member.memory_info()
        except psutil.NoSuchProcess:
            continue
        total += memory.rss
        anonymous += memory.rss - memory.shared
    return total, anonymous


def run_stage(stage: str, cwd: Path, env: dict[str, str]) -> Measured:
    """Run `cnnpipe <stage>` in `cwd`, sampling its process tree's memory every 50 ms."""
    log = cwd / f"{stage}.log"
    started = time.perf_counter()
    with log.open("w") as output:
        child = subprocess.Popen(
            [str(BIN / "cnnpipe"), stage], cwd=cwd, env=env, stdout=output, stderr=output
        )
        tree = psutil.Process(child.pid)
        peak_total = peak_anonymous = 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            with_children = _tree_rss(tree)
            peak_total = max(peak_total, with_children[0])
            peak_anonymous = max(peak_anonymous, with_children[1])
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"cnnpipe {stage} failed in {cwd}:\n{log.read_text()[-3000:]}")
    return Measured(
        seconds,
        usage.ru_maxrss * 1024 / MIB,  # Linux reports kilobytes
        peak_total / MIB,
        peak_anonymous / MIB,
        log.read_text(),
    )


def write_params(folder: Path, images: Path, args: argparse.Namespace) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=f"folder:{images}", image_size=args.image_size)
    params["data"]["workers"] = args.workers
    params["augment"]["copies"] = 0
    params["train"].update(model=args.model, epochs=1, batch_size=args.batch_size, device="cpu")
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def last_rate(output: str) -> float:
    """The last `<number> img/s` a stage printed."""
    rates = re.findall(r"([0-9.]+) img/s", output)
    return float(rates[-1]) if rates else float("nan")


def bench_size(size: int, args: argparse.Namespace) -> dict[str, float]:
    images = write_folder(args.workdir / f"images-{size}", size, os.cpu_count() or 1)
    folder = args.workdir / f"run-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, images, args)
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    prepares = [run_stage("prepare", folder, env) for _ in range(args.repeats)]
    augment = run_stage("augment", folder, env)
    train = run_stage("train", folder, env)
    seconds = statistics.median(run.seconds for run in prepares)
    return {
        "images": size,
        "prepare_s": seconds,
        "prepare_img_s": size / seconds,
        "decode_img_s": statistics.median(last_rate(run.output) for run in prepares),
        "prepare_peak_process_mib": max(run.peak_process_mib for run in prepares),
        "prepare_peak_tree_mib": max(run.peak_tree_mib for run in prepares),
        "augment_s": augment.seconds,
        "train_s": train.seconds,
        "train_epoch_img_s": last_rate(train.output),
        "train_peak_process_mib": train.peak_process_mib,
        "train_peak_anon_mib": train.peak_tree_anon_mib,
    }


COLUMNS = {
    "images": ("images", "{:,}"),
    "prepare_s": ("prepare s (median)", "{:.1f}"),
    "prepare_img_s": ("prepare img/s", "{:.0f}"),
    "decode_img_s": ("decode img/s", "{:.0f}"),
    "prepare_peak_process_mib": ("prepare peak RSS MiB (largest process)", "{:.0f}"),
    "prepare_peak_tree_mib": ("prepare peak RSS MiB (all processes)", "{:.0f}"),
    "augment_s": ("augment s", "{:.1f}"),
    "train_s": ("train (1 epoch) s", "{:.1f}"),
    "train_epoch_img_s": ("epoch img/s", "{:.0f}"),
    "train_peak_process_mib": ("train peak RSS MiB", "{:.0f}"),
    "train_peak_anon_mib": ("train peak RSS MiB without mapped files", "{:.0f}"),
}


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS.values()) + " |"]
    lines.append("|" + "---:|" * len(COLUMNS))
    for row in rows:
        cells = (form.format(row[key]) for key, (_, form) in COLUMNS.items())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cnnpipe-bench"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="data.workers (0: one per core)")
    parser.add_argument("--model", default="seed_cnn", help="train.model for the epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="prepare runs per size (median)")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    now = datetime.datetime.now(datetime.UTC)
    memory = psutil.virtual_memory().total / (1 << 30)
    print(
        f"{now:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores,"
        f" {memory:.0f} GiB; images {args.image_size}x{args.image_size}, train.model {args.model}",
        flush=True,
    )
    rows = []
    for size in args.sizes:
        rows.append(bench_size(size, args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    first, last = rows[0], rows[-1]
    growth = last["prepare_s"] / first["prepare_s"]
    print(f"prepare time x{growth:.1f} for x{last['images'] / first['images']:.0f} images")


if __name__ == "__main__":
    main()
