"""The memory of a served model under concurrent requests for large images.

    uv run dvc repro && uv run python bench/serve_memory.py              # 20 requests at once
    uv run python bench/serve_memory.py --requests 40 --megapixels 40

Starts `cnnpipe serve` on this repository's registered champion, sends `--requests` requests
at once, each one small PNG (a single colour) that decodes to `--megapixels` megapixels, and
samples the server's resident memory (VmRSS) before, during and after. Prints one line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT = 5091


def resident_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def request_body(megapixels: int) -> bytes:
    width = 8000
    image = Image.new("RGB", (width, megapixels * 1_000_000 // width), (120, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return json.dumps(
        {"inputs": {"image": [base64.b64encode(buffer.getvalue()).decode()]}}
    ).encode()


def wait_until_up(server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/ping", timeout=2)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"cnnpipe serve did not start: {server.communicate()[1][-2000:]}")
            time.sleep(0.5)


def post(body: bytes, statuses: list[int]) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{PORT}/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        statuses.append(response.status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--megapixels", type=int, default=40)
    args = parser.parse_args()
    body = request_body(args.megapixels)
    server = subprocess.Popen(
        [str(BIN / "cnnpipe"), "serve", "--port", str(PORT)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until_up(server)
        before, statuses = resident_mb(server.pid), []
        senders = [
            threading.Thread(target=post, args=(body, statuses)) for _ in range(args.requests)
        ]
        for sender in senders:
            sender.start()
        samples = [before]
        while any(sender.is_alive() for sender in senders):
            samples.append(resident_mb(server.pid))
            time.sleep(0.1)
        after = resident_mb(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
    print(
        f"{args.requests} requests at once, each a {len(body) // 1024} KiB body decoding to "
        f"{args.megapixels} MP: {statuses.count(200)} answered; server memory {before} MB "
        f"before, {max(samples)} MB at the peak, {after} MB after"
    )


if __name__ == "__main__":
    main()
