"""``retro-ray info``: what a project directory holds, stage by stage."""

from __future__ import annotations

from retro_ray.project import Project

# Every stage in pipeline order, with the outputs whose size is worth showing.
PIPELINE = (
    ("prep", lambda p: [p.data_dir, p.tokenizer_dir]),
    ("db", lambda p: [p.merged_db_dir]),
    ("embed", lambda p: [p.embeddings_dir]),
    ("index-train", lambda p: []),
    ("index-add", lambda p: [p.index_root]),
    ("query", lambda p: [p.query_root]),
)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(project: Project) -> str:
    lines = [f"project {project.root}"]
    if not project.has_config():
        lines.append("  no config.json: not a retro-ray project yet (run `retro-ray prep`)")
        return "\n".join(lines)
    cfg = project.read_config()
    lines.append(
        f"  corpus {cfg.corpus.path or '(default: Wikipedia vital articles)'}  split {cfg.split}  seed {cfg.seed}  "
        f"seq_length {cfg.seq_length}  chunk_length {cfg.chunk_length}"
    )
    for stage, outputs in PIPELINE:
        report = project.report(stage)
        if report is None:
            lines.append(f"  {stage:<11} not done")
            continue
        size = sum(project.disk_usage(o) for o in outputs(project) if o.exists())
        total_s = sum(report.timings.values())
        lines.append(f"  {stage:<11} done  ({total_s:.1f} s" + (f", {_size(size)} on disk)" if size else ")"))
        for k, v in report.counts.items():
            lines.append(f"              {k:<28} {v:,}" if isinstance(v, int) else f"              {k:<28} {v}")
    return "\n".join(lines)
