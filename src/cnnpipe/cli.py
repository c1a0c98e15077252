"""`cnnpipe <stage>`: run one pipeline stage with the params in ./params.yaml."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from cnnpipe.errors import UserError
from cnnpipe.params import load_params

STAGES = ("prepare", "augment", "train", "transfer", "evaluate")
DISTRIBUTED_STAGES = ("train", "transfer")


def relaunch_under_torchrun(stage: str, nproc: int) -> int:
    """Run this stage again as `nproc` DDP processes on this machine (see README for
    several machines); returns torchrun's exit status."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cnnpipe",
        stage,
    ]
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnpipe", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    args = parser.parse_args(argv)
    try:
        params = load_params()
        nproc = getattr(params, args.stage).nproc if args.stage in DISTRIBUTED_STAGES else 1
        if nproc > 1 and "RANK" not in os.environ:
            return relaunch_under_torchrun(args.stage, nproc)
        stage = importlib.import_module(f"cnnpipe.stages.{args.stage}")
        stage.run(params)
    except UserError as err:
        print(f"cnnpipe {args.stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
