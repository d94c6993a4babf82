"""The ``retro-ray`` command: one subcommand per stage, plus ``info``.

The CLI only parses arguments and ``key.sub=value`` overrides and calls the stage's ``run``: the stage
commands and ``pipeline`` come from the registry of stages (:mod:`retro_ray.stages`). An error the user
can fix (:class:`RetroRayError`) is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.project import Project
from retro_ray.stages import COMMANDS, PIPELINE, run_command
from retro_ray.stages import STAGES as STAGE_SPECS

# The stage commands (the stages, and `index`: index-train then index-add), from the registry:
# the overrides section of each one's run settings (index-train / index-add share `index`'s), its help.
RUN_SECTION = {name: command.section for name, command in COMMANDS.items()}
STAGE_HELP = {name: command.help for name, command in COMMANDS.items()}
STAGES = tuple(STAGE_HELP)
RUN_CONFIGS = {stage: C.RUN_SECTIONS[section] for stage, section in RUN_SECTION.items()}


def _settings_help(module: str, cls: str) -> str:
    """The settings table of a subcommand's config class (imported here, not at CLI import time)."""
    import importlib

    return _help_table(getattr(importlib.import_module(module), cls))


def _help_table(cls: type, prefix: str = "") -> str:
    rows = C.field_help(cls, prefix)
    out = []
    for key, typ, text in rows:
        out.append(f"  {key}  ({typ})")
        out.extend("      " + line for line in textwrap.wrap(text, 88))
    return "\n".join(out)


def _command(sub, name: str, help: str, description: str, settings: tuple[str, str, str]):
    """A subcommand whose description keeps its line breaks, with the settings table of a config class
    (``settings`` = (title, module, class)) as its epilog."""
    return sub.add_parser(name, help=help, description=description,
                          epilog=f"{settings[0]}:\n" + _settings_help(settings[1], settings[2]),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _epilog(stage: str) -> str:
    parts = []
    if stage == "prep":
        parts.append("preprocessing settings (recorded in <project>/config.json):\n" + _help_table(C.ProjectConfig))
    else:
        text = ("preprocessing settings come from <project>/config.json; repeating one is allowed, "
                "changing one is an error.")
        owned = {"index": C.IndexSettings, "index-train": C.IndexSettings, "query": C.QuerySettings}.get(stage)
        if owned is not None:
            section = "index" if stage.startswith("index") else "query"
            text += (f" Exception: the `{section}` settings below belong to this stage and may be set here"
                     " until it has run (the new value is recorded in config.json):\n"
                     + _help_table(owned, f"{section}."))
        parts.append(text)
    parts.append(f"run settings of `{stage}` (change how it runs, not what it makes):\n"
                 + _help_table(RUN_CONFIGS[stage], f"{RUN_SECTION[stage]}."))
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retro-ray",
        description="RETRO on Ray: chunk database, embeddings, index, neighbours, training, serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage, text in STAGE_HELP.items():
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
    p = sub.add_parser("pipeline", help="prep → db → embed → index → query, skipping what is done",
                       description="Run every data stage in order; a stage already complete is skipped. "
                                   "Preprocessing settings go to prep (recorded in config.json); each stage's "
                                   "run settings (prep.*, db.*, embed.*, index.*, query.*) go to that stage.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project-dir", required=True)
    p.add_argument("--config", help="a YAML file of settings; overrides on the command line win")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="start the project over (passed to prep)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p = _command(sub, "train", "pretrain RETRO (or the GPT baseline) with Ray Train + DeepSpeed",
                 "Train on the project's samples and neighbours. Data settings (sequence and "
                 "chunk length, vocabulary, neighbours) come from <project>/config.json. "
                 "Rerunning the same command resumes from the latest checkpoint.",
                 ("settings (NeMo names)", "retro_ray.train.config", "TrainConfig"))
    p.add_argument("--project-dir", help="the prepared project (required unless --dry-run)")
    p.add_argument("--exp-dir", help="where checkpoints, logs and the loss curve go (required unless --dry-run)")
    p.add_argument("--config", default="demo", help="a YAML file, or a shipped config: tiny, demo, 125m, retrofit, and "
                   "Wang et al. 2023's RETRO sizes 148m, 410m, 1.5b, 9.5b (default demo)")
    p.add_argument("--resume", action="store_true", help="continue an experiment whose settings changed")
    p.add_argument("--dry-run", action="store_true",
                   help="start nothing: print parameters, FLOPs per token and step, and memory per GPU for the "
                        "config's ZeRO stage, worker count and micro-batch (data settings from --project-dir, "
                        "else model.seq_length / chunk_length / vocab_size or 2048 / 64 / 50304)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="with --dry-run: the memory of one GPU, to say whether the plan fits (default 80)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p = sub.add_parser("export", help="one-file checkpoint (model.pt) from an experiment, for inference")
    p.add_argument("--exp-dir", required=True, help="experiment directory, run directory or checkpoint")
    p.add_argument("--out", required=True, help="output file, e.g. model.pt")
    p = sub.add_parser("import-hf", help="a local Hugging Face GPT-2 / Llama / Qwen2 directory or GGUF file as a model.pt",
                       description="Read config.json and the safetensors of a local GPT2LMHeadModel, "
                                   "LlamaForCausalLM or Qwen2ForCausalLM directory, or a GGUF file of the llama, qwen2 "
                                   "or gpt2 architecture (as llama.cpp, Ollama and LM Studio keep them; quantised "
                                   "tensors are dequantised to float32), and write a model.pt whose logits equal "
                                   "transformers' own load of it. Nothing is downloaded and no code from it runs. Use "
                                   "it as model.init_from to RETRO-fit it, or with generate / eval as a baseline. A "
                                   "GGUF file's tokenizer is written as a Hugging Face tokenizer directory, for prep's "
                                   "tokenizer.path=.")
    p.add_argument("model_dir", metavar="model", help="the directory save_pretrained wrote, or a .gguf file")
    p.add_argument("--out", required=True, help="output file, e.g. runs/smol/base.pt")
    p.add_argument("--tokenizer-dir", help="for a GGUF file: where its tokenizer goes (tokenizer.json, "
                                           "tokenizer_config.json with the chat template); default <out without .pt>-tokenizer")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="seq_length= (default: the model's positions, a multiple of chunk_length), chunk_length=")
    p = _command(sub, "generate", "generate text with a trained model, neighbours given or retrieved",
                 "Continue a prompt. Neighbours come from neighbors=[...] (NeMo semantics) or, "
                 "with --project-dir, are retrieved at the prompt end and at every chunk boundary.",
                 ("settings", "retro_ray.serve.generate", "GenerateConfig"))
    p.add_argument("--checkpoint", required=True, help="model.pt written by `retro-ray export`")
    p.add_argument("--project-dir", help="the project to retrieve from (and whose tokenizer to use)")
    p.add_argument("--index", default="local", choices=("local", "sharded", "none"),
                   help="local: merged index in this process; sharded: IndexShard actors on Ray; none: no retrieval")
    p.add_argument("--address", help="Ray cluster address, with --index sharded")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON (text, tokens, neighbours used)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p = _command(sub, "add-docs", STAGE_SPECS["add-docs"].help,
                 "Tokenize, chunk, embed and add documents to the chunk database and every index "
                 "file. Training data is untouched; documents already there are skipped. A "
                 "running server picks the new documents up before its next generation.",
                 ("settings", "retro_ray.stages.add_docs", "AddDocsConfig"))
    p.add_argument("--project-dir", required=True)
    p.add_argument("source", help="a .jsonl / .jsonl.gz / .parquet / text file, or a directory of them")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = _command(sub, "eval", "perplexity / bits-per-byte of RETRO vs its GPT baseline, and the knowledge update",
                 "Score the RETRO run (with retrieval, without, at k = 1, 2, 4, the leakage-filtered "
                 "curve) and the GPT baseline on the valid split; measure held-out documents before "
                 "and after add-docs. Writes <project>/eval/report.md, results.json and plots.",
                 ("settings", "retro_ray.eval.config", "EvalConfig"))
    p.add_argument("--project-dir", required=True)
    p.add_argument("--exp-dir", required=True, help="the RETRO run: experiment directory, checkpoint or model.pt")
    p.add_argument("--baseline", help="the GPT baseline: a run (same forms), a model.pt from import-hf, or a local Hugging Face "
                   "directory or .gguf file (imported in memory, its tokenizer checked against the project's); for a RETRO-fit, "
                   "its base. Without it GPT figures are left out")
    p.add_argument("--heldout", help="held-out documents (jsonl); default: <project>/data/heldout.jsonl if prep wrote one")
    p.add_argument("--no-heldout", action="store_true", help="skip the knowledge update")
    p.add_argument("--out", help="output directory (default <project>/eval)")
    p.add_argument("--config", help="a YAML file of settings; overrides on the command line win")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("demo", help="the whole system on the default corpus: data, RETRO, GPT and a RETRO-fit, eval, serving",
                       description=(__import__("retro_ray.demo").demo.__doc__ or "").split("\n\n", 1)[-1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project-dir", default="runs/demo")
    p.add_argument("--stop", action="store_true", help="stop the Serve app after the sample request")
    p.add_argument("--no-serve", action="store_true", help="end after the evaluation")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train_steps=, eval_samples=, retrofit_lr=, port=")
    p = _command(sub, "serve", "the Ray Serve app: /generate, /v1/completions (OpenAI), /documents, /health",
                 "Serve a model over HTTP with retrieval from the project, until Ctrl-C. "
                 "(`serve run serve_config.yaml` runs the same app from a Serve config file.)",
                 ("settings", "retro_ray.serve.config", "ServeConfig"))
    p.add_argument("--project-dir", help="the project to retrieve from and add documents to")
    p.add_argument("--checkpoint", required=True, help="model.pt written by `retro-ray export`")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("info", help="which stages are done, with their counts and sizes")
    p.add_argument("--project-dir", required=True)
    p = sub.add_parser("search", help="print the database chunks nearest to a text",
                       description="Embed TEXT, search the project's index, print the top chunks with their titles.")
    p.add_argument("--project-dir", required=True)
    p.add_argument("text")
    p.add_argument("-k", type=int, default=5, help="how many chunks (default 5)")
    p.add_argument("--sharded", action="store_true",
                   help="search through IndexShard actors on Ray instead of the merged index in this process")
    p.add_argument("--address", help="Ray cluster address, with --sharded")
    p.add_argument("--nprobe", type=int)
    p.add_argument("--ef-search", type=int)
    return parser


def split_settings(stage: str, settings: dict) -> tuple[dict, dict]:
    return C.split_run_settings(RUN_SECTION[stage], settings)


def _settings(args) -> dict:
    base = C.load_yaml(args.config) if args.config else {}
    return C.merge(base, C.parse_overrides(args.overrides))


def cmd_pipeline(args) -> int:
    settings = _settings(args)
    # Check every stage's settings before running anything.
    for stage in PIPELINE:
        project_settings, run_settings = split_settings(stage, settings)
        C.build(RUN_CONFIGS[stage], run_settings, prefix=f"{RUN_SECTION[stage]}.")
    C.build(C.ProjectConfig, split_settings("prep", settings)[0])
    for stage in PIPELINE:
        print(f"== {stage}", flush=True)
        run_stage(stage, Project(args.project_dir), settings, progress=not args.no_progress,
                  address=args.address, overwrite=args.overwrite and stage == "prep",
                  recorded=stage != "prep")
    return 0


def cmd_stage(args) -> int:
    run_stage(args.command, Project(args.project_dir), _settings(args), progress=not args.no_progress,
              address=args.address, overwrite=getattr(args, "overwrite", False))
    return 0


def run_stage(stage: str, project: Project, settings: dict, *, progress: bool, address: str | None,
              overwrite: bool = False, recorded: bool = False) -> None:
    """Run one stage command with its settings; ``recorded``: preprocessing settings were just given to prep."""
    project_settings, run_settings = split_settings(stage, settings)
    if recorded:
        project_settings = {}
    run_cfg = C.build(RUN_CONFIGS[stage], run_settings, prefix=f"{RUN_SECTION[stage]}.")
    report = run_command(stage, project, run_cfg, project_settings, progress=progress, address=address,
                         overwrite=overwrite)
    print(report.format(), flush=True)


def cmd_train(args) -> int:
    from retro_ray.stages.query import load_neighbors
    from retro_ray.train import trainer
    from retro_ray.train.config import load_train_config

    train_cfg = load_train_config(args.config, args.overrides)
    if args.dry_run:
        return cmd_train_dry_run(args, train_cfg)
    missing = [flag for flag, value in (("--project-dir", args.project_dir), ("--exp-dir", args.exp_dir)) if not value]
    if missing:
        raise RetroRayError(f"train needs {' and '.join(missing)} (or --dry-run, which trains nothing).")
    project = Project(args.project_dir)
    project.read_config()  # a clear "not a retro-ray project" before the stage check
    project.require("query", "train")
    _, meta = load_neighbors(project, "train")  # also checks the neighbours still match the project
    k = train_cfg.model.retro.retro_num_neighbors if train_cfg.model.retro.enabled else 0
    factory = trainer.ProjectDatasetFactory(str(project.root), k)
    model_data = trainer.project_model_data(project, int(meta["num_neighbors_save"]))
    report = trainer.run(train_cfg, factory, model_data, args.exp_dir, resume=args.resume, address=args.address)
    print(report.format(), flush=True)
    return 0


def cmd_train_dry_run(args, train_cfg) -> int:
    """Size a training config without starting anything (retro_ray.train.plan)."""
    import dataclasses

    from retro_ray.train.config import resolve_model_config
    from retro_ray.train.plan import format_plan, plan

    m = train_cfg.model
    if args.project_dir:
        project = Project(args.project_dir)
        cfg = project.read_config()
        seq, chunk, vocab = cfg.seq_length, cfg.chunk_length, int(project.derived().get("vocab_size", 50257))
    else:
        seq, chunk, vocab = m.seq_length or 2048, m.chunk_length or 64, m.vocab_size or 50257
    if m.init_from:
        from retro_ray.train.config import decoder_from_base
        from retro_ray.train.export import read_base

        base = read_base(m.init_from, weights=False, seq_length=seq, chunk_length=chunk)[0]
        train_cfg = decoder_from_base(train_cfg, base, m.init_from)
        vocab = base.vocab_size
    model_cfg = resolve_model_config(dataclasses.replace(train_cfg, model=dataclasses.replace(
        train_cfg.model, seq_length=None, chunk_length=None)), seq, chunk, vocab)
    t = train_cfg.trainer
    precision = "bf16" if t.precision == "auto" else t.precision  # the plan is for GPUs, where auto is bf16
    p = plan(model_cfg, num_gpus=t.num_workers, zero_stage=t.zero_stage, precision=precision,
             micro_batch_size=train_cfg.model.micro_batch_size, global_batch_size=train_cfg.model.global_batch_size,
             activation_checkpointing=t.activation_checkpointing, freeze_decoder=model_cfg.retro.freeze_decoder)
    print(format_plan(p, model_cfg, args.gpu_memory_gib), flush=True)
    return 0


def cmd_generate(args) -> int:
    import json

    from retro_ray.serve.generate import GenerateConfig, Generator

    settings = C.parse_overrides(args.overrides)
    if "prompt" in settings and settings["prompt"] is None:
        settings["prompt"] = ""  # `prompt=` is an empty prompt (fine with inference.add_BOS=true)
    cfg = C.build(GenerateConfig, settings)
    if args.index == "sharded":
        from retro_ray.runtime import connect

        connect(args.address, progress=False)
    gen = Generator.load(args.checkpoint, args.project_dir, index=args.index if args.project_dir else "none",
                         device=args.device)
    result = gen.generate([cfg.request()])[0]
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=1))
        return 0
    print(f"prompt ({result.prompt_tokens} tokens): {result.prompt}")
    print(f"generated ({len(result.tokens)} tokens, {result.finish_reason}): {result.text}")
    for ev in result.retrievals:
        print(f"neighbours read from token {ev.position} (query {' '.join(ev.query.split())[:60]!r}):")
        for n in ev.neighbors:
            where = f"[{n.title}] chunk {n.chunk_id}" if n.chunk_id >= 0 else "[given]"
            print(f"  {where}: {' '.join(n.text.split())[:160]}")
    return 0


def cmd_add_docs(args) -> int:
    from retro_ray.stages.add_docs import AddDocsConfig, add_documents

    cfg = C.build(AddDocsConfig, C.parse_overrides(args.overrides))
    report = add_documents(Project(args.project_dir), args.source, cfg, progress=not args.no_progress)
    print(report.format(), flush=True)
    return 0


def cmd_eval(args) -> int:
    from retro_ray.eval import format_results, load_eval_config, run_eval

    cfg = load_eval_config(args.config, args.overrides)
    heldout = False if args.no_heldout else args.heldout
    results = run_eval(args.project_dir, args.exp_dir, args.baseline, cfg, out_dir=args.out, heldout=heldout,
                       progress=not args.no_progress)
    print(format_results(results), flush=True)
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from retro_ray.demo import Demo, DemoConfig

    cfg = C.build(DemoConfig, C.parse_overrides(args.overrides))
    return Demo(Path(args.project_dir), cfg, stop=args.stop, serve=not args.no_serve,
                progress=not args.no_progress).main()


def cmd_serve(args) -> int:
    from retro_ray.serve.app import serve_main
    from retro_ray.serve.config import ServeConfig

    cfg = C.build(ServeConfig, C.parse_overrides(args.overrides))
    serve_main(args.checkpoint, args.project_dir, cfg, blocking=True, address=args.address)
    return 0


def cmd_export(args) -> int:
    from retro_ray.train.export import export

    out = export(args.exp_dir, args.out)
    print(f"exported {out}")
    return 0


def cmd_import_hf(args) -> int:
    from retro_ray.train.export import import_hf, read_export

    allowed = {"seq_length", "chunk_length"}
    overrides = C.parse_overrides(args.overrides)
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise RetroRayError(f"import-hf takes only {', '.join(sorted(allowed))}, not {bad[0]}: the rest of the "
                            "shape comes from the checkpoint's config.json")
    out = import_hf(args.model_dir, args.out, tokenizer_dir=args.tokenizer_dir, **{k: int(v) for k, v in overrides.items()})
    print(f"imported {args.model_dir} -> {out}")
    tok = read_export(out)["data"].get("tokenizer_path")
    if tok:
        print(f"its tokenizer: {Path(tok).parent} (prep tokenizer.path={Path(tok).parent})")
    return 0


def cmd_search(args) -> int:
    from retro_ray.retrieval.retriever import Retriever

    project = Project(args.project_dir)
    if args.sharded:
        from retro_ray.runtime import connect

        connect(args.address, progress=False)
        retriever = Retriever.sharded(project, nprobe=args.nprobe, ef_search=args.ef_search)
    else:
        retriever = Retriever.local(project, nprobe=args.nprobe, ef_search=args.ef_search)
    if args.k < 1:
        raise RetroRayError(f"-k {args.k}: ask for at least one chunk.")
    found = retriever.search_texts([args.text], args.k)
    ids = found.ids[0]
    ids = ids[ids >= 0]
    titles = retriever.db.titles(ids)
    texts = retriever.db.texts(ids)
    print(f"top {len(ids)} chunks for {args.text!r}:")
    for rank, (cid, dist, title, text) in enumerate(zip(ids, found.distances[0], titles, texts), start=1):
        snippet = " ".join(text.split())
        print(f"{rank:>2}. [{title}] chunk {cid}  (distance {dist:.3f})")
        print(f"    {snippet[:300]}{'…' if len(snippet) > 300 else ''}")
    return 0


def cmd_info(args) -> int:
    from retro_ray.info import describe

    print(describe(Project(args.project_dir)))
    return 0


# The commands that are not stages.
OTHER_COMMANDS = {
    "info": cmd_info, "search": cmd_search, "pipeline": cmd_pipeline, "train": cmd_train, "export": cmd_export,
    "import-hf": cmd_import_hf, "generate": cmd_generate, "add-docs": cmd_add_docs, "eval": cmd_eval,
    "demo": cmd_demo, "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    from retro_ray.runtime import hide_known_ray_noise, local_cluster_on_loopback

    hide_known_ray_noise()  # before anything imports ray
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves key=value settings that come after an option (`add-docs DIR f.jsonl --no-progress
    # text_field=body`) unparsed; they are settings all the same.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    local_cluster_on_loopback(getattr(args, "address", None))  # before anything imports ray
    try:
        return OTHER_COMMANDS.get(args.command, cmd_stage)(args)  # the stage commands: cmd_stage
    except RetroRayError as e:
        print(f"retro-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
