"""The data stages, found by name.

Each stage is declared here (:class:`StageSpec`: its name, the stages it requires, where its run settings
live, a line of help) and implemented in ``retro_ray.stages.<module>`` by a
:class:`~retro_ray.stages.base.Stage` subclass, ``STAGE`` there, whose ``run(project, cfg, settings) ->
Report`` is the same for every stage (the skeleton, written once in ``base``). The declarations are read
without importing any stage module (those load Ray Data, Faiss, torch), so that the CLI builds its
subcommands and help from them at no cost.

The CLI's stage commands are the stages, plus ``index``, which runs index-train then index-add
(:data:`COMMANDS`); ``retro-ray pipeline`` runs :data:`PIPELINE`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retro_ray.project import Project, Report
    from retro_ray.stages.base import Stage


@dataclass(frozen=True)
class StageSpec:
    """What a stage is, readable without importing it."""

    name: str                        # the CLI subcommand and the completion marker (.stages/<name>.json)
    module: str                      # retro_ray.stages.<module> implements it (its STAGE)
    help: str                        # one line, for `retro-ray --help`
    requires: tuple[str, ...] = ()   # stages that must have finished first
    section: str | None = None       # the settings section of its run settings (config.RUN_SECTIONS)

    def load(self) -> Stage:
        """The stage itself (imports its module)."""
        return importlib.import_module(f"retro_ray.stages.{self.module}").STAGE


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("prep", "prep", "corpus → tokenizer → token datasets (data/, tokenizer/)", (), "prep"),
    StageSpec("db", "db", "token datasets → chunk database (db/merged/*.hdf5)", ("prep",), "db"),
    StageSpec("embed", "embed", "every chunk → a BERT embedding (embeddings/), Ray Data + actor pool", ("db",), "embed"),
    StageSpec("index-train", "index_train",
              "train the Faiss index on the sampled chunks (index/<type>/<str>/empty.faissindex)", ("embed",), "index"),
    StageSpec("index-add", "index_add", "add every chunk, in IndexShard actors (shards/ + added.faissindex)",
              ("index-train",), "index"),
    StageSpec("query", "query", "neighbours for every chunk of every train / valid sample (query/<split>_<hash>/)",
              ("index-add",), "query"),
    StageSpec("add-docs", "add_docs", "add documents to the retrieval database, without retraining", ("index-add",)),
)}


@dataclass(frozen=True)
class Command:
    """A CLI command that runs stages: one stage, or several in order with one report."""

    name: str
    help: str
    stages: tuple[str, ...]

    @property
    def section(self) -> str:
        """The settings section of its run settings (every stage of a command shares it)."""
        return STAGES[self.stages[0]].section


def _single(name: str) -> Command:
    return Command(name, STAGES[name].help, (name,))


# The stage commands of `retro-ray`, in the order its help lists them.
COMMANDS: dict[str, Command] = {c.name: c for c in (
    _single("prep"), _single("db"), _single("embed"),
    Command("index", "index-train then index-add", ("index-train", "index-add")),
    _single("index-train"), _single("index-add"), _single("query"),
)}
# What `retro-ray pipeline` runs, in order; a command already complete is skipped.
PIPELINE = ("prep", "db", "embed", "index", "query")


def get(name: str) -> Stage:
    """The stage called ``name`` (``prep``, ``db``, ..., ``add-docs``)."""
    return STAGES[name].load()


def run_command(name: str, project: Project, cfg=None, settings=None, **kw) -> Report:
    """Run the stages of command ``name`` in order; ``settings`` go to the first (a later stage finds what
    it recorded). A command of several stages reports them as one (counts, timings and outputs of all)."""
    from retro_ray.project import Report

    reports = [get(stage).run(project, cfg, settings if i == 0 else None, **kw)
               for i, stage in enumerate(COMMANDS[name].stages)]
    if len(reports) == 1:
        return reports[0]
    return Report(stage=name, counts={k: v for r in reports for k, v in r.counts.items()},
                  timings={k: v for r in reports for k, v in r.timings.items()},
                  outputs=[o for r in reports for o in r.outputs], skipped=all(r.skipped for r in reports))
