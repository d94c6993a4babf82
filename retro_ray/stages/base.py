"""The shape every stage has: ``run(project, cfg, settings) -> Report``, its skeleton written once.

:meth:`Stage.run` does, in this order, for every stage:

1. ``check``       the run settings' values (and, for prep, the project settings), before anything is read
2. done?           a stage that has finished is not run again: the settings given are checked against
                   the recorded ones (nothing may change silently) and its recorded Report comes back,
                   ``skipped``
3. the project     a stage that requires others needs a project (config.json) and their completion
4. ``settle``      the project's settings, with the ones this stage owns (``owns``) taken and recorded
5. temporaries     what a killed run left in the stage's directories (``temporaries``) is removed
6. ``work``        the stage itself, which returns its Report
7. mark done       last, so that a killed stage never looks done (a stage that runs every time, add-docs,
                   is never marked)
8. ``finish``      after the mark: its run time as a metric, scratch files that only served a resume

A stage implements ``work`` and, where it differs from the default, the other hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from retro_ray import config as C
from retro_ray.metrics import stage_metrics
from retro_ray.project import Project, Report
from retro_ray.stages import StageSpec


@dataclass
class StageRun:
    """One run of a stage: what it was given, and the project's settings once settled."""

    project: Project
    cfg: Any                     # the stage's run settings (an instance of its run_config)
    settings: Any                # project settings given: overrides (dict); for prep also a ProjectConfig
    progress: bool = True
    address: str | None = None   # Ray cluster address (None: RAY_ADDRESS, else a new local cluster)
    overwrite: bool = False      # start the project over (prep)
    inputs: dict = field(default_factory=dict)  # what else a stage takes (add-docs: the documents)
    config: C.ProjectConfig | None = None      # the project's settings, once settled


class Stage:
    """A data stage. Subclasses set ``spec`` (from :data:`retro_ray.stages.STAGES`) and ``run_config``,
    and implement :meth:`work`."""

    spec: ClassVar[StageSpec]
    run_config: ClassVar[type]             # the frozen dataclass of its run settings
    owns: ClassVar[tuple[str, ...]] = ()   # project settings (key prefixes) it may still set before it has run
    marks_done: ClassVar[bool] = True      # False: a stage that runs every time (and is never skipped)
    inputs: ClassVar[tuple[str, ...]] = ()  # what else run() takes, by keyword (add-docs: the documents)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def requires(self) -> tuple[str, ...]:
        return self.spec.requires

    # ------------------------------------------------------------------ the skeleton
    def run(self, project: Project, cfg: Any = None, settings: Any = None, *, progress: bool = True,
            address: str | None = None, overwrite: bool = False, **inputs: Any) -> Report:
        """Run the stage (see the module docstring); ``cfg``: its run settings (default: the defaults);
        ``settings``: project settings, as ``key.sub=value`` overrides give them (a nested dict)."""
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            raise TypeError(f"{self.name}.run() got an unexpected keyword argument {unknown[0]!r}")
        run = StageRun(project, self.run_config() if cfg is None else cfg, {} if settings is None else settings,
                       progress, address, overwrite, inputs)
        self.check(run)
        if self.marks_done and project.is_done(self.name):
            self.settle(run, done=True)
            report = project.report(self.name)
            report.skipped = True
            return report
        if self.requires and not project.has_config():
            project.read_config()  # raises: not a retro-ray project
        for stage in self.requires:
            project.require(stage, self.name)
        run.config = self.settle(run, done=False)
        for directory in self.temporaries(run):
            project.remove_stale_temporaries(directory)
        report = self.work(run)
        if self.marks_done:
            project.mark_done(report)
        self.finish(run, report)
        return report

    # ------------------------------------------------------------------ the hooks
    def check(self, run: StageRun) -> None:
        """Refuse run settings that cannot work, before anything is read or written."""

    def settle(self, run: StageRun, done: bool) -> C.ProjectConfig:
        """The project's settings with ``run.settings`` applied: a recorded setting may be repeated, never
        changed; one this stage ``owns`` may be changed until the stage has run (``done`` False)."""
        return run.project.check_overrides(run.settings, changeable=() if done else self.owns)

    def temporaries(self, run: StageRun) -> Iterable[Path]:
        """Directories where a killed run of this stage may have left temporary files."""
        return ()

    def work(self, run: StageRun) -> Report:
        raise NotImplementedError

    def finish(self, run: StageRun, report: Report) -> None:
        """After the stage is marked done: its run time as a metric."""
        stage_metrics(self.name).seconds(sum(report.timings.values()), step="run")
