"""`cnnpipe <stage>`: run one pipeline stage with the params in ./params.yaml."""

from __future__ import annotations

import argparse
import importlib
import sys

from cnnpipe.errors import UserError
from cnnpipe.params import load_params

STAGES = ("prepare", "augment", "train", "transfer", "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnpipe", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    args = parser.parse_args(argv)
    try:
        params = load_params()
        stage = importlib.import_module(f"cnnpipe.stages.{args.stage}")
        stage.run(params)
    except UserError as err:
        print(f"cnnpipe {args.stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
