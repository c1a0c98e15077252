"""`cnnpipe <stage>` runs one pipeline stage with ./params.yaml; `cnnpipe predict` classifies
image files with the registered champion or a local model folder; `cnnpipe serve` serves the
champion over HTTP; `cnnpipe ui` opens MLflow's UI on the pipeline's runs; `cnnpipe preset`
prints a preset's overrides; `cnnpipe retrain` pulls, runs the pipeline with overrides, pushes
and summarises (see retrain.py)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from cnnpipe import layout
from cnnpipe.errors import UserError
from cnnpipe.params import load_params, preset

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}  # Linux names
# A stage's garbage collector runs a full collection after this many middle-generation ones
# (CPython's default: 10).
FULL_COLLECTION_EVERY = 100


# Under `relaunch_under_torchrun`: the folder where each process writes its one-line error
# (printed there, each process's copy would repeat it), read by the process that launched them.
RANK_ERRORS = "CNNPIPE_RANK_ERRORS"


def relaunch_under_torchrun(stage: str, nproc: int) -> int:
    """Run this stage again as `nproc` DDP processes on this machine (see README for several
    machines), each with cores ÷ `nproc` threads (torchrun would give one). torchrun's agent runs
    in this process with its logging off, so that a process's one-line error is not buried
    under the agent's logs and traceback: the errors are printed once each (exit status 2), or
    the first process that failed otherwise is named (1). The processes find each other on the
    loopback interface (`LOOPBACK`: the workers' gloo and NCCL sockets, the address they are
    told) unless the environment names other interfaces."""
    import logging
    import shutil
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    errors = Path(tempfile.mkdtemp(prefix="cnnpipe-ranks-"))
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    defaults = (LOOPBACK if sys.platform == "linux" else {}) | {"OMP_NUM_THREADS": threads}
    os.environ.update({k: v for k, v in defaults.items() if k not in os.environ})
    os.environ[RANK_ERRORS] = str(errors)
    logging.disable(logging.CRITICAL)
    command = ["--standalone", "--local-addr=127.0.0.1", f"--nproc-per-node={nproc}"]
    try:
        run(parse_args([*command, "-m", "cnnpipe", stage]))
        return 0
    except ChildFailedError as failed:
        return _report_processes(stage, nproc, failed, errors)
    except SignalException as signalled:  # Ctrl-C or kill: the agent stopped the processes
        print(stopped(stage), file=sys.stderr)
        return 128 + signalled.sigval
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _report_processes(stage: str, nproc: int, failed: ChildFailedError, errors: Path) -> int:
    messages = {path.read_text() for path in errors.iterdir()}
    for message in sorted(messages):
        print(f"cnnpipe {stage}: error: {message}", file=sys.stderr)
    if messages:
        return 2
    rank, failure = failed.get_first_failure()
    code = failure.exitcode
    how = f"signal {failure.signal_name()}" if code < 0 else f"exit status {code}"
    print(
        f"cnnpipe {stage}: error: process {rank} of the {nproc} it ran in ended with {how} (its"
        " output is above)",
        file=sys.stderr,
    )
    return 1


def stopped(command: str) -> str:
    """What a command stopped by Ctrl-C (or kill) says, instead of Python's traceback."""
    stage = layout.STAGES.get(command)
    again = ": run it again to go on from its last finished epoch" if stage and stage.trains else ""
    return f"cnnpipe {command}: stopped{again}"


def report_error(command: str, message: str) -> None:
    """A user's error, in one line on stderr; in a process `relaunch_under_torchrun` started,
    into its errors folder."""
    folder = os.environ.get(RANK_ERRORS)
    if folder and "RANK" in os.environ:
        Path(folder, f"process-{os.environ['RANK']}").write_text(message)
    else:
        print(f"cnnpipe {command}: error: {message}", file=sys.stderr)


def run_stage(name: str) -> int:
    """Run one stage: a data stage inside the MLflow run the stage table describes, handed
    its recorder (tracking.py); record, which is MLflow's own, as it is."""
    params = load_params()
    stage = layout.STAGES[name]
    require_inputs(stage)
    nproc = getattr(params, name).nproc if stage.trains else 1
    if nproc > 1 and "RANK" not in os.environ:
        return relaunch_under_torchrun(name, nproc)
    module = import_stage(stage)
    if not stage.recorded:
        module.run(params)
        return 0
    from cnnpipe import tracking

    with tracking.recording(stage, params) as recorder:
        module.run(params, recorder)
    return 0


def require_inputs(stage: layout.Stage) -> None:
    """A stage run before the stages that make its inputs stops here, in one line naming the
    first missing input and what makes it (the stage would fail on its first read of it)."""
    for path in stage.deps:
        if not path.exists():
            makers = [s.name for s in layout.STAGES.values() if path in s.outs + s.committed]
            maker = f"the {makers[0]} stage's output" if makers else "an input"
            raise UserError(
                f"{path} is missing ({maker}): run dvc repro {stage.name}, which runs the "
                "stages before it, or dvc pull to fetch their outputs"
            )


def import_stage(stage: layout.Stage) -> ModuleType:
    """The stage's module, imported with the garbage collector off; then everything imported
    so far is frozen out of the collector's reach (see `main`), and full collections run a
    tenth as often, since the modules a stage imports later (timm, MLflow's store) would make
    each one walk their objects again."""
    gc.disable()
    try:
        return importlib.import_module(stage.entry)
    finally:
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
        gc.enable()


def predict(paths: list[Path], model_dir: Path | None) -> int:
    """Classify files with a model folder, or with the registered champion (named by
    params.yaml's `tracking.registered_model`)."""
    from cnnpipe import serving

    if model_dir is not None:
        classifier = serving.ImageClassifier(model_dir)
    else:
        classifier = serving.load(champion_uri())
    answers = serving.predict_files(classifier, paths)
    for path, answer in answers:
        print(f"{path}: {answer}")
    return 1 if any(answer.startswith("error:") for _, answer in answers) else 0


def champion_uri() -> str:
    """The registered champion's model URI (named by params.yaml's
    `tracking.registered_model`), its version said on stderr."""
    from cnnpipe import registry

    version = registry.required_champion(load_params().tracking.registered_model)
    print(
        f"model: {version.name} version {version.version} (@{registry.CHAMPION})", file=sys.stderr
    )
    return registry.version_uri(version)


def can_listen(host: str, port: int) -> None:
    """A one-line `UserError` when `host:port` cannot be listened on (taken, or not an address
    of this machine), said before a server starts."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise UserError(
            f"cannot listen on {host}:{port} ({reason}): choose another --port"
        ) from None


def serve(host: str, port: int) -> int:
    """The registered champion over HTTP (model_server.py) until Ctrl-C."""
    from cnnpipe import model_server

    can_listen(host, port)
    uri = champion_uri()
    print(f"serving on http://{host}:{port}/invocations   (Ctrl-C stops it)", flush=True)
    model_server.serve(uri, host, port)
    print("model server stopped")
    return 0


def ui(port: int) -> int:
    """MLflow's UI on this repository's store, with the address that opens the experiment on
    its training runs (a tracking server already has its own UI: its address is printed)."""
    from cnnpipe import tracking

    experiment = load_params().tracking.experiment
    found = tracking.client(experiment).get_experiment_by_name(experiment)
    uri = tracking.tracking_uri()
    page = tracking.run_link(found.experiment_id)
    if tracking.is_server(uri):
        print(f"MLflow UI: {uri.rstrip('/')}/{page}")
        return 0
    can_listen("127.0.0.1", port)
    print(f"MLflow UI: http://127.0.0.1:{port}/{page}   (Ctrl-C stops it)", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--workers", "1"]
    command += ["--port", str(port), "--uvicorn-opts", "--log-level warning"]
    command += ["--app-name", "cnnpipe"]  # mlflow_ui.py: opens in the Model training view
    # MLflow's job runner (seven worker processes for GenAI jobs) serves nothing of ours and
    # outlives a Ctrl-C of the UI: it stays off. The UI runs in its own session, so a Ctrl-C
    # reaches its server once, forwarded by MLflow (twice, uvicorn stops with a traceback).
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # A process started with SIGINT ignored (a script's background job, a test runner's
    # worker) keeps ignoring it: this command answers it whoever started it. `kill` and a
    # closed terminal (SIGTERM, SIGHUP) stop it the same way: the server, in its own session,
    # would outlive this process otherwise.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, signal.default_int_handler)
    server = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        stop_session(server, signal.SIGINT, grace_s=5)
        print("MLflow UI stopped")
        return 0


def stop_session(process: subprocess.Popen, signum: int, grace_s: float) -> None:
    """Send `signum` to `process`, the leader of its own session; what is left of the session
    after `grace_s` is killed."""
    process.send_signal(signum)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def tune(args: argparse.Namespace) -> int:
    """`cnnpipe tune`: run the study (tune.py), or show or apply its best trial."""
    from cnnpipe import tune as tuning

    if args.best or args.apply:
        return tuning.show_best(args.overrides, args.storage, args.study, apply=args.apply)
    return tuning.run(args.overrides, args.trials, args.jobs, args.storage, args.study)


def yaml_scalar(value: object) -> str:
    """A params value as `dvc exp run -S` reads it (YAML): true/false, numbers, plain text."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def port_number(text: str) -> int:
    """A TCP port to listen on, 1-65535 (argparse turns the error into one usage line)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number 1-65535")
    return int(text)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cnnpipe", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    for stage in layout.STAGES:
        commands.add_parser(stage, help=f"run the {stage} stage")
    predicting = commands.add_parser("predict", help="classify image files")
    predicting.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    predicting.add_argument(
        "--model", type=Path, help="a model folder (default: the registered champion)"
    )
    commands.add_parser(
        "retrain", add_help=False, help="pull, run with overrides, push, summarise (retrain -h)"
    )
    serving = commands.add_parser("serve", help="the registered champion over HTTP")
    serving.add_argument("--port", type=port_number, default=5001, help="port (default 5001)")
    serving.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)"
    )
    showing = commands.add_parser("ui", help="MLflow's UI on this repository's runs")
    showing.add_argument(
        "--port", type=port_number, default=5000, help="port on 127.0.0.1 (default 5000)"
    )
    tuning = commands.add_parser(
        "tune", help="an Optuna search, each trial a DVC experiment (params.yaml: tune)"
    )
    tuning.add_argument("--trials", type=int, help="trials in the study (tune.trials)")
    tuning.add_argument("--jobs", type=int, help="trials side by side here (tune.jobs)")
    tuning.add_argument("--storage", help="the study's database URL (tune.storage)")
    tuning.add_argument("--study", help="the study's name (tune.study)")
    tuning.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml override for every trial, as dvc exp run -S (tune.* ones: the search)",
    )
    tuning.add_argument("--best", action="store_true", help="print the best trial and stop")
    tuning.add_argument(
        "--apply", action="store_true", help="write the best trial's params into params.yaml"
    )
    presetting = commands.add_parser(
        "preset", help="print a preset's overrides as dvc exp run options (-S key=value ...)"
    )
    presetting.add_argument("name", help="a file in presets/, without .yaml (e.g. tiny)")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one command. The libraries a stage imports (torch, MLflow, ...) create hundreds of
    thousands of objects that live until the process ends; CPython's garbage collector would
    walk them all in each full collection, and again when the interpreter shuts down: 2-4 s of
    a stage's start-up and exit. So they are frozen (`gc.freeze`) once imported, and
    everything is frozen before the process exits; objects made later are collected as
    usual."""
    try:
        return _command(sys.argv[1:] if argv is None else argv)
    finally:
        gc.freeze()


def _command(argv: list[str]) -> int:
    if argv[:1] == ["retrain"]:  # retrain parses its own options
        from cnnpipe import retrain

        return retrain.main(argv[1:])
    args = parser().parse_args(argv)
    try:
        if args.command == "predict":
            return predict(args.paths, args.model)
        if args.command == "serve":
            return serve(args.host, args.port)
        if args.command == "ui":
            return ui(args.port)
        if args.command == "tune":
            return tune(args)
        if args.command == "preset":
            overrides = preset(args.name)
            print(" ".join(f"-S {key}={yaml_scalar(value)}" for key, value in overrides.items()))
            return 0
        return run_stage(args.command)
    except UserError as err:
        report_error(args.command, str(err))
        return 2
    except KeyboardInterrupt:  # Ctrl-C
        if "RANK" not in os.environ:  # in a DDP process, the process that started it says it
            print(stopped(args.command), file=sys.stderr)
        return 130
    except Exception:
        from cnnpipe import tracking

        lost = tracking.lost_server_error()
        if lost is None:
            raise
        report_error(args.command, lost)
        return 2


if __name__ == "__main__":
    sys.exit(main())
