"""`cnnpipe tune`: an Optuna study whose trials are DVC experiments.

Ask and tell: this process asks the study for a trial, samples `tune.space`, and runs the
trial as `dvc exp run --temp -n <study>-<number> -S ...` (the user's `-S` overrides first),
`tune.jobs` of them side by side, each with its share of the cores. The stages learn they run
in a trial from `CNNPIPE_TRIAL` (trial.py): the training stages report every epoch's val score
and stop when the pruner says so. When an experiment ends, its committed metrics files give
the trial's value (the best epoch's `tune.metric` of the `tune.target` model) or say it was
pruned; that is told to the study. The study lives in an SQL database (`tune.storage`): a
SQLite file here, or PostgreSQL shared by workers on several machines. Each worker sends a
heartbeat for its running trials; a trial not heard from for `tune.stale_after_s` (its worker
was killed) is failed and retried by whichever worker looks next. MLflow: one parent run per
study (tune_mlflow.py); every trial's pipeline run is its child.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnpipe import layout, trial, tune_mlflow
from cnnpipe.errors import UserError
from cnnpipe.params import (
    Params,
    TuneParams,
    load_params,
    parse_overrides,
    parse_value,
    read_yaml,
    validate,
    with_overrides,
)
from cnnpipe.tracking import repo_root

STORAGE_FILE = "tune.db"  # the default storage, at the repository root (git-ignored)
LOCAL_STORAGE = "local"  # tune.storage's name for it
LOGS = Path(".dvc/tmp/tune")  # each trial's `dvc exp run` output, <experiment>.log
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
POLL_S = 1.0
ENDED = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
# A worker stops, with the last reason, after this many trials in a row whose experiment failed
# (each one is failed and not counted, so a study whose every trial fails would never end) ...
FAILED_IN_A_ROW = 3
# ... or this many sampled combinations in a row that the params' rules refuse (a combination
# is checked before its experiment starts: each searched value alone was checked at start-up).
REFUSED_IN_A_ROW = 50
OPEN_ATTEMPTS = 3
PARENT_WAIT_S = 60


@dataclass(frozen=True)
class Settings:
    """What a worker runs: the tune section (with `tune.*` overrides), the other overrides
    every trial gets, the storage URL and the pipeline's params."""

    tune: TuneParams
    overrides: dict[str, object]
    storage: str
    params: Params
    trial_base: dict  # params.yaml as parsed, with `overrides`: what each trial's -S change

    def refusal(self, sampled: dict[str, object]) -> str | None:
        """Why the stages would refuse the params of a trial that draws `sampled`, or None."""
        try:
            validate(with_overrides(self.trial_base, sampled), "the params it drew")
        except UserError as error:
            return str(error)
        return None


def settings(
    pairs: list[str], trials: int | None, jobs: int | None, storage: str | None, study: str | None
) -> Settings:
    """The worker's settings: params.yaml, `-S` overrides (`tune.*` ones change the search,
    the others every trial), then the command-line options."""
    load_params()  # the file as it is must be valid
    raw = read_yaml(layout.PARAMS_FILE)
    overrides = parse_overrides(pairs)
    tune_keys = {k: v for k, v in overrides.items() if k.split(".")[0] == "tune"}
    trial_keys = {k: v for k, v in overrides.items() if k not in tune_keys}
    options = {"trials": trials, "jobs": jobs, "storage": storage, "study": study}
    tune_keys |= {f"tune.{k}": v for k, v in options.items() if v is not None}
    params = validate(with_overrides(raw, trial_keys | tune_keys), "the overrides")
    trial_raw = with_overrides(raw, trial_keys)
    for key, entry in params.tune.space.items():  # every value a trial may take is valid
        for value in entry.choices if entry.choices is not None else (entry.low, entry.high):
            validate(with_overrides(trial_raw, {key: value}), f"tune.space.{key} = {value!r}")
    url = params.tune.storage
    if url == LOCAL_STORAGE:
        url = f"sqlite:///{repo_root() / STORAGE_FILE}"
    return Settings(params.tune, trial_keys, url, params, trial_raw)


def open_storage(url: str, stale_after_s: int) -> optuna.storages.RDBStorage:
    """The study database, with heartbeats: a trial silent for `stale_after_s` is failed and
    enqueued again (RetryHeartbeatStaleTrialCallback)."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")

    def connect() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=max(1, stale_after_s // 4),
            grace_period=stale_after_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
        )

    for attempt in range(1, OPEN_ATTEMPTS):  # workers started together race to make the tables
        with contextlib.suppress(Exception):
            return connect()
        time.sleep(attempt)
    try:
        return connect()
    except Exception as err:  # SQLAlchemy / driver errors: unreachable, refused, bad URL
        reason = " ".join(str(err).split())[:300]
        raise UserError(f"cannot open the study storage {url}: {reason}") from None


def make_sampler(tune: TuneParams, seed: int | None) -> optuna.samplers.BaseSampler:
    if tune.sampler == "grid":
        grid = {key: entry.choices for key, entry in tune.space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)


def open_study(config: Settings, storage) -> tuple[optuna.Study, bool]:
    """The study, created if missing: (study, whether this worker created it). The worker
    that creates it samples reproducibly from `seed`; workers that join draw fresh seeds, or
    they would all sample the same params."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = config.tune
    direction = trial.direction(tune.metric)
    pruner = trial.make_pruner(tune.pruner, tune.startup_trials)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=tune.study,
            direction=direction,
            sampler=make_sampler(tune, config.params.seed),
            pruner=pruner,
        )
        study.set_user_attr("metric", tune.metric)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=tune.study, storage=storage, sampler=make_sampler(tune, None), pruner=pruner
        )
    if study.direction.name.lower() != direction:
        raise UserError(
            f"study {tune.study} {study.direction.name.lower()}s; tune.metric {tune.metric} "
            "wants the other direction: choose another --study"
        )
    return study, False


def sample(asked: optuna.Trial, tune: TuneParams) -> dict[str, object]:
    """The trial's params, in space order; a `when` entry only where its condition holds."""
    chosen: dict[str, object] = {}
    for key, entry in tune.space.items():
        if any(chosen.get(name, object()) not in values for name, values in entry.when.items()):
            continue
        if entry.choices is not None:
            chosen[key] = asked.suggest_categorical(key, entry.choices)
        elif isinstance(entry.low, int) and isinstance(entry.high, int):
            step = int(entry.step or 1)
            chosen[key] = asked.suggest_int(key, entry.low, entry.high, step=step, log=entry.log)
        else:
            chosen[key] = asked.suggest_float(
                key, entry.low, entry.high, step=entry.step, log=entry.log
            )
    return chosen


def yaml_value(value: object) -> str:
    """A value as `dvc exp run -S` reads it: JSON is YAML (null, true, 0.001), text as is."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass
class Running:
    """One trial's `dvc exp run`, in its own process group."""

    asked: optuna.Trial
    name: str
    process: subprocess.Popen
    log: Path


def die_with_parent() -> None:
    """In a trial's `dvc exp run`, before it starts: ask Linux to kill it when this worker
    dies, even by SIGKILL (a worker stopped by SIGTERM or Ctrl-C stops its trials itself)."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def experiment_name(study: str, number: int) -> str:
    return f"{study}-{number}"


def launch(
    asked: optuna.Trial, sampled: dict[str, object], config: Settings, parent_run: str | None
) -> Running:
    """Start the trial's DVC experiment, with the params it drew (`sampled`), with its share
    of the cores."""
    tune = config.tune
    name = experiment_name(tune.study, asked.number)
    asked.set_user_attr("experiment", name)
    asked.set_user_attr("host", os.uname().nodename)
    link = trial.TrialLink(
        config.storage,
        tune.study,
        asked._trial_id,
        asked.number,
        tune.metric,
        tune.target,
        tune.pruner,
        tune.startup_trials,
        tune.warmup_epochs,
        parent_run,
    )
    threads = str(max(1, (os.cpu_count() or 1) // tune.jobs))
    env = os.environ | link.to_env() | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    sets = [f"{k}={yaml_value(v)}" for k, v in (config.overrides | sampled).items()]
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    command = [dvc, "exp", "run", "--temp", "-n", name]
    command += [arg for pair in sets for arg in ("-S", pair)]
    log = repo_root() / LOGS / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
    shown = ", ".join(f"{k}={yaml_value(v)}" for k, v in sampled.items())
    print(f"trial {asked.number} ({name}) started: {shown}", flush=True)
    return Running(asked, name, process, log)


def experiment_file(baseline: str, name: str, path: Path) -> dict | None:
    """A committed JSON file of the experiment `name` made from `baseline`, or None."""
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
    shown = subprocess.run(
        ["git", "show", f"{ref}:{path.as_posix()}"],
        capture_output=True,
        text=True,
        cwd=repo_root(),
        check=False,
    )
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def outcome(name: str, baseline: str, tune: TuneParams) -> tuple[TrialState, float | None, str]:
    """The finished experiment's result: (state, value, a few words on it)."""
    stages = trial.TARGET_STAGES[tune.target]
    metrics = {m.stage: experiment_file(baseline, name, m.metrics) for m in layout.TRAINED}
    if any(metrics[stage] is None for stage in stages):
        return TrialState.FAIL, None, "the experiment has no training metrics"
    pruned = {s: m[trial.PRUNED_KEY] for s, m in metrics.items() if m and trial.PRUNED_KEY in m}
    if pruned:
        where = ", ".join(f"{stage} after epoch {epoch}" for stage, epoch in pruned.items())
        return TrialState.PRUNED, None, where
    values = [metrics[stage][f"best_{tune.metric}"] for stage in stages]
    value = min(values) if trial.direction(tune.metric) == "minimize" else max(values)
    return TrialState.COMPLETE, value, f"{tune.metric} {value:.4f}"


def room_left(study: optuna.Study, total: int) -> bool:
    trials = study.get_trials(deepcopy=False, states=COUNTED)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    return waiting or len(trials) < total


def surplus(study: optuna.Study, asked: optuna.Trial, total: int) -> bool:
    """Whether `asked` is one too many: workers that asked at once can overshoot `total`."""
    earlier = study.get_trials(deepcopy=False, states=COUNTED)
    return sum(t.number < asked.number for t in earlier) >= total


class Heartbeat(threading.Thread):
    """Records a heartbeat for every trial this worker runs, every `interval` seconds."""

    def __init__(self, storage, interval: int) -> None:
        super().__init__(daemon=True)
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self.stopping = threading.Event()

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)  # a trial without one never goes stale
        self.trial_ids.add(trial_id)

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            for trial_id in list(self.trial_ids):
                self.storage.record_heartbeat(trial_id)


def finish(
    study: optuna.Study, job: Running, baseline: str, tune: TuneParams
) -> tuple[FrozenTrial, str]:
    """Tell the study how the trial's experiment ended; the trial, and a few words on it."""
    code = job.process.returncode
    if code != 0:
        tail = job.log.read_text(errors="replace").strip().splitlines()[-3:]
        state, value, words = (
            TrialState.FAIL,
            None,
            f"dvc exp run exited {code}: " + " | ".join(tail) + f" (log: {job.log})",
        )
    else:
        state, value, words = outcome(job.name, baseline, tune)
    study.tell(job.asked, value, state=state, skip_if_finished=True)
    print(f"trial {job.asked.number} ({job.name}) {ENDED[state]}: {words}", flush=True)
    return study.get_trials(deepcopy=False)[job.asked.number], words


def stop_all(study: optuna.Study, running: list[Running]) -> None:
    """On Ctrl-C or SIGTERM: end the trials' experiments, fail the trials and enqueue them
    again, so that a restarted `cnnpipe tune` (or another worker) runs them."""
    for job in running:
        if job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGTERM)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    for job in running:
        job.process.wait()
        study.tell(job.asked, state=TrialState.FAIL, skip_if_finished=True)
        retry(study, study.get_trials(deepcopy=False)[job.asked.number])
        print(f"trial {job.asked.number} ({job.name}) stopped; it will be retried", flush=True)


def not_run(study: optuna.Study, asked: optuna.Trial, reason: str) -> None:
    """Fail `asked` without running it (a finished trial takes no attributes: this one first)."""
    asked.set_user_attr("not_run", reason)
    study.tell(asked, state=TrialState.FAIL)


def next_trial(study: optuna.Study, config: Settings) -> tuple[optuna.Trial, dict] | None:
    """A new trial and the params it drew, or None when the study has its trials. A drawn
    combination the params' rules refuse is failed at once, without an experiment, and drawn
    again; after `REFUSED_IN_A_ROW` of them the search space is the problem: a UserError."""
    for _ in range(REFUSED_IN_A_ROW):
        asked = study.ask()
        if surplus(study, asked, config.tune.trials):
            not_run(study, asked, "the study already had its trials")
            return None
        sampled = sample(asked, config.tune)
        refusal = config.refusal(sampled)
        if refusal is None:
            return asked, sampled
        not_run(study, asked, refusal)
        print(f"trial {asked.number} not run: {refusal}", flush=True)
    raise UserError(
        f"{REFUSED_IN_A_ROW} combinations in a row drawn from tune.space were refused, the last"
        f" one so: {refusal}: narrow tune.space so that the values it searches fit together"
    )


def work(study: optuna.Study, config: Settings, parent_run: str | None) -> None:
    """Run trials, `jobs` at a time, until the study has its trials, or `FAILED_IN_A_ROW`
    trials in a row have failed (a UserError, once the running trials have ended)."""
    tune, running, failed = config.tune, [], []
    baseline = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=repo_root()
    ).stdout.strip()
    heartbeat = Heartbeat(study._storage, max(1, tune.stale_after_s // 4))
    heartbeat.start()
    try:
        while True:
            optuna.storages.fail_stale_trials(study)
            while len(running) < tune.jobs and len(failed) < FAILED_IN_A_ROW:
                drawn = room_left(study, tune.trials) and next_trial(study, config)
                if not drawn:
                    break
                heartbeat.add(drawn[0]._trial_id)
                running.append(launch(*drawn, config, parent_run))
            if not running:
                break
            time.sleep(POLL_S)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                heartbeat.trial_ids.discard(job.asked._trial_id)
                finished, words = finish(study, job, baseline, tune)
                tune_mlflow.log_trial(parent_run, study, finished)
                failed = [*failed, words] if finished.state == TrialState.FAIL else []
    except KeyboardInterrupt:
        stop_all(study, running)
        raise
    finally:
        heartbeat.stopping.set()
    if len(failed) >= FAILED_IN_A_ROW:
        raise UserError(
            f"{len(failed)} trials in a row failed, the last one so: {failed[-1]}: fix what it"
            " says and run cnnpipe tune again to go on with the study"
        )


def interrupt_on_sigterm() -> None:
    """SIGTERM (`kill`) stops a worker as Ctrl-C does."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run(pairs: list[str], trials=None, jobs=None, storage=None, study_name=None) -> int:
    config = settings(pairs, trials, jobs, storage, study_name)
    study, created = open_study(config, open_storage(config.storage, config.tune.stale_after_s))
    experiment = config.params.tracking.experiment
    parent_run = tune_mlflow.parent_run(study, experiment, config.tune, created)
    interrupt_on_sigterm()
    print(
        f"study {study.study_name} ({config.storage}): {config.tune.trials} trials, "
        f"{config.tune.jobs} at a time here; MLflow run {parent_run}",
        flush=True,
    )
    try:
        work(study, config, parent_run)
    except KeyboardInterrupt:
        print("stopped; run cnnpipe tune again to continue the study", file=sys.stderr)
        return 130
    finally:
        tune_mlflow.summarise(parent_run, study)
    print_summary(study)
    return 0


def print_summary(study: optuna.Study) -> None:
    for frozen in study.get_trials(deepcopy=False):
        if frozen.state == TrialState.FAIL and "not_run" in frozen.user_attrs:
            continue
        value = "" if frozen.value is None else f" {frozen.value:.4f}"
        print(
            f"  trial {frozen.number}: {frozen.user_attrs.get('experiment', '-')} "
            f"{ENDED.get(frozen.state, frozen.state.name.lower())}{value}"
        )
    best = best_trial(study)
    if best is not None:
        print(describe_best(study, best))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if done else None


def describe_best(study: optuna.Study, best: FrozenTrial) -> str:
    name = best.user_attrs.get("experiment", "?")
    params = ", ".join(f"{k}={yaml_value(v)}" for k, v in best.params.items())
    metric = study.user_attrs.get("metric", "value")
    return (
        f"best: trial {best.number}, {metric} {best.value:.4f}, DVC experiment {name} "
        f"(on {best.user_attrs.get('host', '?')}): {params}\n"
        f"  dvc exp apply {name}   # its params and results in the workspace\n"
        f"  cnnpipe tune --study {study.study_name} --apply   # only its params, into params.yaml"
    )


def load_existing(config: Settings) -> optuna.Study:
    storage = open_storage(config.storage, config.tune.stale_after_s)
    try:
        return optuna.load_study(study_name=config.tune.study, storage=storage)
    except KeyError:
        raise UserError(
            f"no study {config.tune.study} in {config.storage}: run cnnpipe tune first"
        ) from None


def show_best(pairs: list[str], storage=None, study_name=None, apply: bool = False) -> int:
    """Print the study's best trial; with `apply`, write its params into params.yaml."""
    config = settings(pairs, None, None, storage, study_name)
    study = load_existing(config)
    best = best_trial(study)
    if best is None:
        raise UserError(f"study {study.study_name} has no finished trial yet")
    print(describe_best(study, best))
    if apply:
        text = layout.PARAMS_FILE.read_text()
        for key, value in best.params.items():
            text = set_in_place(text, key, value)
        validate(parse_value(text), f"{layout.PARAMS_FILE} as applied")
        layout.PARAMS_FILE.write_text(text)
        print(f"wrote trial {best.number}'s params into {layout.PARAMS_FILE}")
    return 0


def set_in_place(text: str, key: str, value: object) -> str:
    """`text` (params.yaml) with the block-style `key` (`section.sub.leaf`) set to `value`,
    comments and alignment kept."""
    path, stack, lines = key.split("."), [], text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        stripped = line.lstrip(" ")
        if not stripped.strip() or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        name, colon, rest = stripped.partition(":")
        if not colon:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, name.strip()))
        if [n for _, n in stack] != path:
            continue
        body, hash_, comment = rest.rstrip("\n").partition(" #")
        width = len(body)
        new = f" {yaml_value(value)}"
        tail = f"{' ' * max(1, width - len(new) + 1)}#{comment}" if hash_ else ""
        lines[i] = f"{' ' * indent}{name}:{new}{tail}\n"
        return "".join(lines)
    raise UserError(f"{key} is not a block-style key of {layout.PARAMS_FILE}: set it by hand")
