"""`cnnpipe <stage>`: run one pipeline stage with the params in ./params.yaml.
`cnnpipe retrain`: pull, run the pipeline with overrides, push, summarise (see retrain.py)."""

from __future__ import annotations

import argparse
import importlib
import sys

from cnnpipe.errors import UserError
from cnnpipe.params import load_params

STAGES = ("prepare", "augment", "train", "transfer", "evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["retrain"]:
        from cnnpipe import retrain

        return retrain.main(argv[1:])
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
