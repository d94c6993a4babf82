"""Connecting to Ray, the same way for every stage.

``ray.init()`` starts a local cluster when no address is given; ``--address`` or RAY_ADDRESS connects
to a running one. A stage never assumes it started Ray: tests and notebooks may have already.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None = None, progress: bool = True) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
        log.info("connected to Ray at %s", address or "a new local cluster")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    # One line per operator is enough for a person to follow; the per-task log noise is not.
    ctx.print_on_execution_start = False


def run_block_tasks(fn, items: list[dict], num_cpus: float, desc: str) -> list[dict]:
    """Run ``fn(item) -> dict`` over ``items`` with Ray Data, one task per item; results in order.

    Each item is its own block, so every item becomes one task and the cluster's CPUs are all used.
    The tasks write their own outputs (atomically); what comes back is a small dict of counts.
    """
    import ray

    if not items:
        return []
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(fn, num_cpus=num_cpus).materialize()
    rows = ds.take_all()
    order = {it["block_key"]: i for i, it in enumerate(items)}
    rows.sort(key=lambda r: order[r["block_key"]])
    log.info("%s: %d blocks done", desc, len(rows))
    return rows
