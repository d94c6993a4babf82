"""Connecting to Ray, the same way for every stage, and running a stage's blocks as Ray tasks.

With no address, ``ray.init(address="local")`` starts a local cluster; ``--address`` or RAY_ADDRESS connects
to a running one. A stage never assumes it started Ray: tests and notebooks may have already. A local
cluster listens on loopback only (``local_cluster_on_loopback``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

from retro_ray.errors import RetroRayError

log = logging.getLogger(__name__)


# Whether run_block_tasks shows a progress bar; connect() sets it, as it sets Ray Data's.
_SHOW_PROGRESS = {"on": True}
_TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"


# Ray Train 2.60 starts a placement-group cleaner actor that asks the State API every second whether
# the run's controller is alive. The State API is served by the dashboard, which a local cluster of
# ours does not start, so the cleaner logs this warning every second of training (hundreds of lines
# in a demo run). Starting the dashboard is no cure: the cleaner finds "its" cluster through
# /tmp/ray/ray_current_cluster, i.e. the newest cluster on the machine. A second local cluster with
# a dashboard would answer that it has no such controller, which the cleaner's code reads as dead:
# it would remove the first run's placement group mid-training. So the driver just does not print
# the line (the worker's log file keeps it).
_RAY_NOISE = "Failed to query Ray Train Controller actor state"


def hide_known_ray_noise() -> None:
    """Keep the warning above out of what the driver prints (Ray's RAY_DEDUP_LOGS_SKIP_REGEX).

    Call before ray is imported (the CLI does, first thing); a value the user set is kept.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", _RAY_NOISE)


# Ray's own switch for a cluster confined to one machine (its default on macOS and Windows): "0" makes
# the node's address the loopback one, so the GCS, raylets, object managers, workers and agents of a
# cluster started here listen on 127.0.0.1 only, instead of on the machine's address and on all
# interfaces. Ray reads it once, when it is imported, and the processes it starts inherit it.
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_cluster_on_loopback(address: str | None) -> bool:
    """A local cluster this process starts (no ``address``, no RAY_ADDRESS) listens on loopback only.

    Call before ray is imported (the CLI does). A value of RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER the user set
    is kept ("1": Ray's default, every interface). Connecting to a running cluster changes nothing: the
    driver must then be reachable at the machine's address. Returns whether the loopback setting holds."""
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    return os.environ.setdefault(LOOPBACK_ONLY_ENV, "0") == "0"


def _ray_reads_every_interface() -> bool:
    from ray._private import ray_constants  # what Ray read from the environment when it was imported

    return bool(ray_constants.ENABLE_RAY_CLUSTER)


def connect(address: str | None = None, progress: bool = True) -> None:
    loopback = local_cluster_on_loopback(address)  # before ray is imported here, if it was not yet
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        # "local": a new cluster of this process, even where `ray start` left its address on the machine
        # (ray.init() with no address would connect to that one). "auto" asks for that one explicitly.
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        if loopback and _ray_reads_every_interface():
            log.warning("ray was imported before %s=0 was set, so this local cluster listens on every interface; "
                        "set it before importing ray to keep the cluster on loopback", LOOPBACK_ONLY_ENV)
        ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
        log.info("connected to Ray at %s", "a new local cluster" if address == "local" else address)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    # One line per operator is enough for a person to follow; the per-task log noise is not.
    ctx.print_on_execution_start = False
    _SHOW_PROGRESS["on"] = progress


def want_gpu(flag: str) -> bool:
    """Whether a stage's ``use_gpu`` setting (auto | true | false) means GPUs, on the connected cluster."""
    import ray

    flag = str(flag).lower()
    gpus = ray.cluster_resources().get("GPU", 0)
    if flag in ("true", "1", "yes"):
        if gpus == 0:
            raise RetroRayError("use_gpu=true but the Ray cluster has no GPU; set use_gpu=auto or false.")
        return True
    if flag in ("false", "0", "no"):
        return False
    if flag != "auto":
        raise RetroRayError(f"use_gpu={flag!r} is not one of auto, true, false.")
    return gpus > 0


def current_node() -> str:
    """The Ray node id of the calling process (a task, an actor or the driver)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def count_by_node(node_ids) -> dict[str, int]:
    """How many blocks (or shards) each node ran, for a stage's report: {node id: count}."""
    return dict(sorted(Counter(node_ids).items()))


def _run_block(fn, item: dict, serial_tokenizers: bool) -> dict:
    """One block task; its result gains the ``node_id`` it ran on. A task that reserves one CPU runs HF
    tokenizers on one thread.

    Without that, each of the tasks running side by side would start a rayon thread per core of the
    machine, and they would take turns on the same cores.
    """
    if not serial_tokenizers:
        return {**fn(item), "node_id": current_node()}
    before = os.environ.get(_TOKENIZERS_PARALLELISM)
    os.environ[_TOKENIZERS_PARALLELISM] = "false"
    try:
        return {**fn(item), "node_id": current_node()}
    finally:
        if before is None:
            os.environ.pop(_TOKENIZERS_PARALLELISM, None)
        else:
            os.environ[_TOKENIZERS_PARALLELISM] = before


def run_block_tasks(fn, items: list[dict], num_cpus: float, desc: str) -> list[dict]:
    """Run ``fn(item) -> dict`` over ``items`` as Ray tasks, one task per item; results in item order,
    each with the ``node_id`` of the node that ran it.

    Every item is submitted at once (an autoscaling cluster sees the whole backlog) and Ray runs as
    many side by side as the cluster's CPUs allow. The tasks write their own outputs (atomically), so
    a task that is retried, or a rerun after a crash, does no harm; what comes back is a small dict of
    counts. Plain tasks rather than Ray Data: for a list of independent blocks Ray Data only adds its
    planning and start-up (seconds on a small machine) and keeps fewer tasks running.
    A RetroRayError raised in a task is raised here as itself.
    """
    import ray
    from tqdm.auto import tqdm

    from retro_ray.errors import RetroRayError

    if not items:
        return []
    task = ray.remote(_run_block).options(num_cpus=num_cpus, scheduling_strategy="SPREAD", name=f"retro_ray.{desc}")
    serial = num_cpus <= 1
    refs = [task.remote(fn, item, serial) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    rows: list[dict | None] = [None] * len(refs)
    pending = list(refs)
    try:
        with tqdm(total=len(refs), desc=desc, unit="block", disable=not _SHOW_PROGRESS["on"]) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                for ref in done:
                    rows[index[ref]] = ray.get(ref)
                bar.update(len(done))
    except ray.exceptions.RayTaskError as e:
        for ref in pending:
            ray.cancel(ref)
        if isinstance(e.cause, RetroRayError):
            raise e.cause from None
        raise
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    log.info("%s: %d blocks done", desc, len(rows))
    return rows  # type: ignore[return-value]


def find_user_error(e: BaseException) -> RetroRayError | None:
    """A RetroRayError raised in a task, an actor or a Train worker, wherever Ray wrapped it."""
    seen: set[int] = set()
    todo: list = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, RetroRayError):
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
        todo += list(getattr(x, "worker_failures", {}).values())
        todo.append(getattr(x, "controller_failure", None))
    return None


def take_all_or_rerun(ds, stage: str) -> list[dict]:
    """``ds.take_all()`` for a stage whose blocks are written atomically, one by one: a user error raised
    in an actor comes back as itself, one line; anything else that ends the run (a node died and Ray ran
    out of retries, say) becomes one line that says to rerun the stage, which does the missing blocks."""
    try:
        return ds.take_all()
    except Exception as e:  # noqa: BLE001 - every failure gets one line; the blocks written are kept
        user = find_user_error(e)
        if user is not None:
            raise RetroRayError(str(user)) from None
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RetroRayError(
            f"{stage} stopped: {type(e).__name__}: {first[:300]}; nothing was marked done: rerun "
            f"`retro-ray {stage}` to finish the missing blocks (the finished ones are kept)"
        ) from None


# --------------------------------------------------------------------------------------------------
# the CPU's bf16 support
# --------------------------------------------------------------------------------------------------
def cpu_has_native_bf16() -> tuple[bool, str]:
    """Whether the CPU computes bf16 natively (AMX tiles or AVX512-BF16), and what told us."""
    try:
        import torch

        amx = bool(torch.cpu._is_amx_tile_supported())
        avx = bool(torch.cpu._is_avx512_bf16_supported())
        if amx or avx:
            return True, "AMX" if amx else "AVX512-BF16"
        source = f"torch reports no AMX/AVX512-BF16 (cpu capability {torch.backends.cpu.get_cpu_capability()})"
        return False, source
    except (AttributeError, RuntimeError):
        pass
    try:
        flags: set[str] = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return False, "CPU flags unknown"
    if "amx_bf16" in flags:
        return True, "AMX (amx_bf16 flag)"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16 (avx512_bf16 flag)"
    return False, "no amx_bf16/avx512_bf16 CPU flag"


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX bf16 tiles: the bf16 matrix units that make bf16 training faster than
    fp32 on a CPU (trainer.precision=auto picks bf16 only where they exist)."""
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split(":", 1)[1].split() for line in f)
    except OSError:
        return False
