"""The ``retro-ray`` command: one subcommand per stage, plus ``info``.

The CLI only parses arguments and ``key.sub=value`` overrides and calls the stage's ``run``. An error
the user can fix (:class:`RetroRayError`) is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.project import Project

# Stage name → (its run-settings dataclass, the section name of its overrides)
RUN_CONFIGS = {"prep": C.PrepRunConfig, "db": C.DbRunConfig}
STAGES = ("prep", "db")


def _help_table(cls: type, prefix: str = "") -> str:
    rows = C.field_help(cls, prefix)
    out = []
    for key, typ, text in rows:
        out.append(f"  {key}  ({typ})")
        out.extend("      " + line for line in textwrap.wrap(text, 88))
    return "\n".join(out)


def _epilog(stage: str) -> str:
    parts = []
    if stage == "prep":
        parts.append("preprocessing settings (recorded in <project>/config.json):\n" + _help_table(C.ProjectConfig))
    else:
        parts.append("preprocessing settings come from <project>/config.json; repeating one is allowed, "
                     "changing one is an error.")
    parts.append(f"run settings of `{stage}` (change how it runs, not what it makes):\n"
                 + _help_table(RUN_CONFIGS[stage], f"{stage}."))
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retro-ray",
        description="RETRO on Ray: chunk database, embeddings, index, neighbours, training, serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, text in (("prep", "corpus → tokenizer → token datasets (data/, tokenizer/)"),
                        ("db", "token datasets → chunk database (db/merged/*.hdf5)")):
        p = sub.add_parser(stage, help=text, description=text, epilog=_epilog(stage),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--project-dir", required=True, help="the project directory")
        p.add_argument("--config", help="a YAML file of settings; overrides on the command line win")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if stage == "prep":
            p.add_argument("--overwrite", action="store_true",
                           help="delete what retro-ray wrote in the project directory and start over")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings, as in the list below")
    p = sub.add_parser("info", help="which stages are done, with their counts and sizes")
    p.add_argument("--project-dir", required=True)
    return parser


def split_settings(stage: str, settings: dict) -> tuple[dict, dict]:
    """Separate a stage's run settings (its own section) from preprocessing settings."""
    settings = dict(settings)
    run = settings.pop(stage, {}) or {}
    for other in STAGES:
        if other != stage and other in settings:
            settings.pop(other)  # a shared YAML file may hold every stage's section
    if not isinstance(run, dict):
        raise RetroRayError(f"`{stage}` is a section of run settings; write e.g. {stage}.docs_per_block=1000.")
    return settings, run


def _settings(args) -> dict:
    base = C.load_yaml(args.config) if args.config else {}
    return C.merge(base, C.parse_overrides(args.overrides))


def cmd_stage(args) -> int:
    project = Project(args.project_dir)
    progress = not args.no_progress
    project_settings, run_settings = split_settings(args.command, _settings(args))
    run_cfg = C.build(RUN_CONFIGS[args.command], run_settings, prefix=f"{args.command}.")
    if args.command == "prep":
        from retro_ray.prep import tokens

        cfg = C.build(C.ProjectConfig, project_settings)
        report = tokens.run(project, cfg, run_cfg, overwrite=args.overwrite, progress=progress, address=args.address)
    elif args.command == "db":
        from retro_ray.prep import db

        report = db.run(project, run_cfg, project_settings, progress=progress, address=args.address)
    else:  # pragma: no cover
        raise AssertionError(args.command)
    print(report.format())
    return 0


def cmd_info(args) -> int:
    from retro_ray.info import describe

    print(describe(Project(args.project_dir)))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return cmd_info(args)
        return cmd_stage(args)
    except RetroRayError as e:
        print(f"retro-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
