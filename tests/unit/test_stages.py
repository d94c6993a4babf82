"""The stages' common shape: the registry, the Stage skeleton, and who may import a stage (no Ray)."""

import ast
import dataclasses
from pathlib import Path

import pytest

import retro_ray
from retro_ray import config as C
from retro_ray import stages
from retro_ray.errors import RetroRayError
from retro_ray.project import Project, Report
from retro_ray.stages import StageSpec
from retro_ray.stages.base import Stage, StageRun

PACKAGE = Path(retro_ray.__file__).parent


def test_every_stage_is_found_by_name_in_a_module_named_after_it():
    assert list(stages.STAGES) == ["prep", "db", "embed", "index-train", "index-add", "query", "add-docs"]
    for name, spec in stages.STAGES.items():
        stage = stages.get(name)
        assert isinstance(stage, Stage) and stage.name == name and stage.spec is spec
        assert spec.module == name.replace("-", "_") and stage.__module__ == f"retro_ray.stages.{spec.module}"
        assert dataclasses.is_dataclass(stage.run_config)
        assert all(r in stages.STAGES for r in stage.requires)
        if spec.section is not None:
            assert stage.run_config is C.RUN_SECTIONS[spec.section]
        module = __import__(stage.__module__, fromlist=["run"])
        assert module.run == stage.run  # `<stage module>.run(project, cfg, settings)` is the stage's run


def test_the_pipeline_runs_each_stage_after_what_it_requires():
    order = [s for command in stages.PIPELINE for s in stages.COMMANDS[command].stages]
    assert order == ["prep", "db", "embed", "index-train", "index-add", "query"]
    for i, name in enumerate(order):
        assert set(stages.STAGES[name].requires) <= set(order[:i]), name


def test_the_cli_stage_commands_come_from_the_registry():
    from retro_ray import cli

    assert cli.STAGES == tuple(stages.COMMANDS) and cli.PIPELINE == stages.PIPELINE
    assert cli.STAGE_HELP["index"] == "index-train then index-add"
    assert cli.RUN_CONFIGS["index-add"] is C.IndexRunConfig


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


LIBRARIES = ["retrieval", "model", *(p.name for p in PACKAGE.glob("*.py") if p.name != "cli.py")]


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_library_imports_no_stage(library):
    paths = [PACKAGE / library] if library.endswith(".py") else sorted((PACKAGE / library).rglob("*.py"))
    for path in paths:
        stage_imports = sorted(n for n in _imports(path) if n == "retro_ray.stages" or n.startswith("retro_ray.stages."))
        assert not stage_imports, f"{path.relative_to(PACKAGE)} imports {stage_imports}"


# ----------------------------------------------------------------------------------------------
# The skeleton, on a stage of this test's own
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _RunSettings:
    blocks: int = 1


class _Echo(Stage):
    spec = StageSpec("echo", "echo", "a test stage", requires=("prep",))
    run_config = _RunSettings
    owns = ("query.",)

    def __init__(self):
        self.calls: list[str] = []

    def check(self, run: StageRun) -> None:
        if run.cfg.blocks <= 0:
            raise RetroRayError("blocks must be positive.")

    def temporaries(self, run: StageRun):
        return [run.project.data_dir]

    def work(self, run: StageRun) -> Report:
        self.calls.append("work")
        assert not list(run.project.data_dir.glob(".*.tmp*"))  # cleaned before the work
        assert run.project.marker_path("echo").exists() is False  # marked only after the work
        return Report(stage="echo", counts={"num_neighbors_query": run.config.query.num_neighbors_query},
                      timings={"echo": 0.0})

    def finish(self, run: StageRun, report: Report) -> None:
        self.calls.append("finish")


def test_the_skeleton_checks_requires_settles_cleans_works_and_marks_done(tmp_path):
    p = Project(tmp_path / "p")
    echo = _Echo()
    with pytest.raises(TypeError, match="unexpected keyword argument 'overides'"):
        echo.run(p, overides={})
    with pytest.raises(RetroRayError, match="blocks must be positive"):
        echo.run(p, _RunSettings(blocks=0))  # the run settings first, before the project is looked at
    with pytest.raises(RetroRayError, match="is not a retro-ray project"):
        echo.run(p)
    p.write_config(C.ProjectConfig())
    with pytest.raises(RetroRayError, match="`echo` needs the `prep` stage"):
        echo.run(p)
    p.mark_done(Report(stage="prep"))
    with pytest.raises(RetroRayError, match="chunk_length=32 was given but"):
        echo.run(p, settings={"chunk_length": 32})  # a recorded setting is never changed
    assert echo.calls == []
    p.data_dir.mkdir()
    (p.data_dir / ".x.tmp-1").write_text("left by a killed run")

    report = echo.run(p, settings={"query": {"num_neighbors_query": 30}})  # a setting the stage owns
    assert echo.calls == ["work", "finish"] and not report.skipped
    assert report.counts == {"num_neighbors_query": 30} and p.read_config().query.num_neighbors_query == 30
    assert p.is_done("echo") and p.report("echo").counts == report.counts

    again = echo.run(p, settings={"query": {"num_neighbors_query": 30}})
    assert again.skipped and again.counts == report.counts and echo.calls == ["work", "finish"]
    with pytest.raises(RetroRayError, match="query.num_neighbors_query=31 was given but"):
        echo.run(p, settings={"query": {"num_neighbors_query": 31}})  # owned only until it has run
