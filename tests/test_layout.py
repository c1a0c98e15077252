"""`dvc.yaml` against the stage table in `cnnpipe.layout`, and `dvc.lock` against the code.

No DVC runs here: `dvc.yaml` is read as YAML, the stages' code deps are derived from their
imports, and `dvc.lock`'s hashes are compared with the files.

The rule for code deps: a stage depends on the modules that can change its outputs, which are
the `cnnpipe` modules its module imports, directly or through another module, at the top or
inside a function; except interfaces and error types (`changes_no_output`: the recorder
protocol, the error type and its message text), which change no output. A stage records to
MLflow only through the recorder it is handed, so MLflow's modules (tracking, registry,
serving) and what only they import are not among its imports: editing how a run is logged
retrains nothing.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml

from cnnpipe import layout
from conftest import REPO

SOURCE = REPO / "src"
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())


def imported_modules(module: str) -> set[str]:
    """`module` and every `cnnpipe` module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = SOURCE / Path(*name.split("."))
        tree = ast.parse(
            (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
        )
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("cnnpipe.")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnnpipe"):
                todo += [
                    f"{node.module}.{a.name}"
                    if (SOURCE / node.module.replace(".", "/") / f"{a.name}.py").exists()
                    else node.module
                    for a in node.names
                ]
    return {name for name in seen if name != "cnnpipe"}


def module_path(name: str) -> Path:
    return SOURCE / f"{name.replace('.', '/')}.py"


def changes_no_output(name: str) -> bool:
    """An interface or an error type: a module of imports, constants, class definitions whose
    bodies hold only docstrings, `...`, annotations and method stubs, exception classes, and
    functions that return text (an error message). Nothing in it can compute a stage's
    output."""

    def inert(body: list[ast.stmt]) -> bool:
        return all(
            isinstance(node, ast.Expr | ast.AnnAssign | ast.Pass)
            or (isinstance(node, ast.FunctionDef) and inert(node.body))
            or (isinstance(node, ast.If) and inert(node.body) and inert(node.orelse))
            or isinstance(node, ast.Import | ast.ImportFrom)
            for node in body
        )

    def harmless(node: ast.stmt) -> bool:
        if isinstance(node, ast.ClassDef):
            bases = {getattr(base, "id", "") for base in node.bases}
            return inert(node.body) or bool(bases & {"Exception", "ValueError"})
        if isinstance(node, ast.FunctionDef):
            return getattr(node.returns, "id", None) == "str"
        return isinstance(node, ast.Expr | ast.Import | ast.ImportFrom | ast.Assign) or (
            isinstance(node, ast.If) and inert(node.body)  # if TYPE_CHECKING: imports
        )

    return all(harmless(node) for node in ast.parse(module_path(name).read_text()).body)


def code_deps(stage: str) -> set[str]:
    modules = imported_modules(layout.STAGES[stage].entry)
    return {f"src/{m.replace('.', '/')}.py" for m in modules if not changes_no_output(m)}


def declared(stage: str) -> dict:
    return DVC_YAML["stages"][stage]


def out_paths(entries: list) -> dict[str, dict]:
    """dvc.yaml outs/metrics/plots entries as {path: options}."""
    found = {}
    for entry in entries or []:
        path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
        found[path] = options or {}
    return found


def test_the_pipeline_is_the_layouts_stages_in_order():
    assert list(DVC_YAML["stages"]) == list(layout.STAGES)


@pytest.mark.parametrize("stage", list(layout.STAGES))
def test_each_stage_declares_the_params_the_layout_says_it_reads(stage):
    assert declared(stage)["params"] == list(layout.STAGES[stage].params)
    assert declared(stage)["cmd"] == f"cnnpipe {stage}"
    assert declared(stage).get("always_changed", False) == layout.STAGES[stage].always_changed


@pytest.mark.parametrize("stage", list(layout.STAGES))
def test_each_stage_depends_on_its_data_and_every_module_it_imports(stage):
    deps = set(declared(stage)["deps"])
    data = {str(path) for path in layout.STAGES[stage].deps}
    assert data <= deps, f"{stage} misses data deps {sorted(data - deps)}"
    code = {dep for dep in deps if dep.startswith("src/")}
    imported = code_deps(stage)
    assert code == imported, (
        f"{stage}: dvc.yaml lacks {sorted(imported - code)}, lists unused {sorted(code - imported)}"
    )


@pytest.mark.parametrize("stage", list(layout.STAGES))
def test_each_stage_writes_the_layouts_outputs(stage):
    spec, entry = layout.STAGES[stage], declared(stage)
    outs = out_paths(entry.get("outs")) | out_paths(entry.get("metrics"))
    outs |= out_paths(entry.get("plots"))
    assert set(outs) == {str(p) for p in (*spec.outs, *spec.committed, *spec.persist)}
    for path in spec.committed:
        assert outs[str(path)].get("cache") is False, f"{path} should be committed (cache: false)"
    for path in spec.persist:
        assert outs[str(path)].get("persist") is True, path


def test_the_stage_table_finds_a_missing_import():
    """What the dependency test catches: evaluate draws with plots.py, so a dvc.yaml without
    it would leave reports/figures stale after a change to a plot."""
    assert "src/cnnpipe/plots.py" in code_deps("evaluate")
    assert "src/cnnpipe/stages/augment.py" not in code_deps("evaluate")


def test_only_interfaces_and_error_messages_are_left_out_of_code_deps():
    """The rule's exception is narrow: the error type and the recorder protocol; a module
    that computes anything but text (even one function of it) is a dep."""
    assert changes_no_output("cnnpipe.errors") and changes_no_output("cnnpipe.recorder")
    others = ("cnnpipe.layout", "cnnpipe.rules", "cnnpipe.fit", "cnnpipe.models")
    assert not any(changes_no_output(m) for m in others)


MLFLOW_MODULES = {
    "cnnpipe.tracking",
    "cnnpipe.registry",
    "cnnpipe.serving",
    "cnnpipe.record",
    "cnnpipe.mlflow_ui",
    "cnnpipe.model_server",
}


@pytest.mark.parametrize("stage", [s for s in layout.STAGES if layout.STAGES[s].recorded])
def test_a_data_stage_imports_neither_mlflow_nor_our_mlflow_modules(stage):
    """Editing a log line, a plot drawn only for MLflow or an error message reruns no data
    stage: none of them imports the modules that talk to MLflow (their runs come from the
    stage runner), and no module they import imports MLflow itself."""
    modules = imported_modules(layout.STAGES[stage].entry)
    assert not modules & MLFLOW_MODULES, f"{stage} imports {sorted(modules & MLFLOW_MODULES)}"
    if stage in ("train", "transfer"):
        assert "cnnpipe.plots" not in modules  # their only pictures go to MLflow
    for module in modules:
        tree = ast.parse(module_path(module).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(name.split(".")[0] == "mlflow" for name in names), module


def test_no_stage_imports_another_stage():
    for stage in layout.STAGES:
        others = {layout.STAGES[s].entry for s in layout.STAGES if s != stage}
        assert not imported_modules(layout.STAGES[stage].entry) & others, stage


def test_dvc_lock_matches_the_code_it_was_made_with():
    """A fresh clone starts from a baseline that matches its code: after changing code a stage
    depends on, rerun `uv run dvc repro` and commit dvc.lock."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    stale = []
    for name, stage in lock["stages"].items():
        for dep in stage.get("deps", []):
            path = REPO / dep["path"]
            if dep["path"].endswith(".py"):
                digest = hashlib.md5(path.read_bytes()).hexdigest() if path.exists() else "gone"
                if digest != dep["md5"]:
                    stale.append(f"{name}: {dep['path']}")
        declared_code = {d for d in declared(name)["deps"] if d.endswith(".py")}
        locked_code = {d["path"] for d in stage.get("deps", []) if d["path"].endswith(".py")}
        assert declared_code == locked_code, f"{name}: dvc.lock predates dvc.yaml's deps"
    assert not stale, f"dvc.lock is out of step with: {stale}; rerun uv run dvc repro"


def test_the_committed_outputs_are_the_ones_dvc_lock_records():
    """The small outputs committed to git (`cache: false`: metrics, tables, the report) are
    the files dvc.lock records, so a fresh clone's `dvc repro` does not redo evaluate. Running
    a stage by hand rewrites them: rerun `uv run dvc repro` before committing."""
    committed = set(
        subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
    files = [out for out in outs if out["path"] in committed]
    assert len(files) >= 5  # each stage's metrics, evaluate's tables and the report
    changed = [
        out["path"]
        for out in files
        if hashlib.md5((REPO / out["path"]).read_bytes()).hexdigest() != out["md5"]
    ]
    assert not changed, f"{changed} differ from dvc.lock; rerun uv run dvc repro"
