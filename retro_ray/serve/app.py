"""Building and running the Ray Serve application: RETRO generation over HTTP.

This module only assembles the application (``make_app``; ``build_app`` for ``serve run``, Serve
config files and a RayService) and runs it for ``retro-ray serve`` (``serve_main``). The parts:

    ingress.py              RetroIngress: the FastAPI app (routes, auth, limits, OpenAI shapes, SSE)
    generator.py            RetroGenerator: the Generator (generate.py), batching, streaming, documents
    embedder_deployment.py  RetroEmbedder: the retriever's BERT encoder, batched across replicas
    schemas.py              request and response bodies, and what a valid request is
    errors.py               RequestError, the one error type, and its unwrapping from Ray's errors
    config.py               ServeConfig

Deployment names (what a Serve config's ``deployments:`` list overrides): RetroIngress,
RetroGenerator, RetroEmbedder.
"""

import os
import signal
import threading
import time
from pathlib import Path

from ray import serve
from ray.serve import Application

from retro_ray import config as C
from retro_ray.errors import RetroRayError
from retro_ray.serve.config import ServeConfig
from retro_ray.serve.embedder_deployment import RetroEmbedder
from retro_ray.serve.generator import RetroGenerator
from retro_ray.serve.ingress import RetroIngress, hash_token

__all__ = ["ServeConfig", "build_app", "make_app", "serve_main"]


def _check_inputs(checkpoint: str | None, project_dir: str | None, cfg: ServeConfig) -> None:
    from retro_ray.project import Project

    if not checkpoint:
        raise RetroRayError("no checkpoint given; pass checkpoint=<model.pt written by `retro-ray export`>.")
    where = "" if Path(checkpoint).expanduser().is_absolute() else (
        f" (relative to {Path.cwd()}, where the application is built: use absolute paths in a Serve config file)")
    if not Path(checkpoint).expanduser().is_file():
        raise RetroRayError(f"checkpoint {checkpoint} does not exist{where} or is a directory; give the model.pt written by "
                            "`retro-ray export`.")
    if project_dir is None:
        if cfg.index != "none":
            raise RetroRayError(f"index={cfg.index} needs project_dir=<the project the model was trained on>; "
                                "give it, or set index=none to serve without retrieval.")
        return
    if not Path(project_dir).expanduser().is_dir():
        where = "" if Path(project_dir).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
        raise RetroRayError(f"project_dir {project_dir} does not exist{where}; give the retro-ray project the model was "
                            "trained on (absolute paths in a Serve config file).")
    project = Project(project_dir)
    project.read_config()
    if cfg.index != "none":
        project.require("index-add", "serve")


def make_app(checkpoint: str, project_dir: str | None, cfg: ServeConfig = ServeConfig(), *,
             token: str | None = None) -> Application:
    """The bound application (ingress → generator → embedder). ``token`` overrides $auth_token_env."""
    _check_inputs(checkpoint, project_dir, cfg)
    checkpoint = str(Path(checkpoint).expanduser().resolve())
    project_dir = str(Path(project_dir).expanduser().resolve()) if project_dir is not None else None
    cfg_dict = C.to_dict(cfg)
    embedder = None
    if cfg.index != "none":
        embedder = RetroEmbedder.options(
            ray_actor_options={"num_cpus": cfg.embedder_num_cpus, "num_gpus": cfg.embedder_num_gpus},
            max_ongoing_requests=64,
        ).bind(project_dir, cfg.device)
    generator = RetroGenerator.options(
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "initial_replicas": max(1, cfg.min_replicas),
                            "target_ongoing_requests": cfg.target_ongoing_requests},
        # Up to four batches wait in the replica's own FIFO queue (else the handle's router holds them and
        # retries with backoff, which lengthens the tail latency: benchmarks/README.md), plus room for
        # /health calls.
        max_ongoing_requests=4 * cfg.max_batch_size + 4,
        ray_actor_options={"num_cpus": cfg.generator_num_cpus, "num_gpus": cfg.generator_num_gpus},
    ).bind(checkpoint, project_dir, cfg_dict, embedder)
    digest = hash_token(token if token is not None else os.environ.get(cfg.auth_token_env))
    return RetroIngress.options(
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus}, max_ongoing_requests=1024,
    ).bind(generator, cfg_dict, digest)


def build_app(args: dict) -> Application:
    """Application builder for ``serve run`` / Serve config files / a RayService.

    ``args``: ``project_dir`` and ``checkpoint`` (the model.pt), plus any ServeConfig field by name.
    """
    args = dict(args or {})
    checkpoint = args.pop("checkpoint", None)
    project_dir = args.pop("project_dir", None)
    cfg = C.build(ServeConfig, args)
    return make_app(checkpoint, project_dir, cfg)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_main(checkpoint: str, project_dir: str | None, cfg: ServeConfig = ServeConfig(), blocking: bool = True,
               address: str | None = None) -> str:
    """``retro-ray serve``: start the application on Ray (a local cluster unless RAY_ADDRESS/address names one),
    print its URL, and with ``blocking`` wait until Ctrl-C, then take the application down. Returns the URL."""
    import ray

    from retro_ray.runtime import connect

    app = make_app(checkpoint, project_dir, cfg)
    connect(address, progress=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    auth = os.environ.get(cfg.auth_token_env)
    print(f"retro-ray serving at {url}  (POST /generate, POST /v1/completions, GET /health, docs at {url}/docs)"
          + (f"; bearer token from ${cfg.auth_token_env}" if auth else ""), flush=True)
    print(f"  curl -s {url}/generate -d '{{\"prompt\": \"The Moon is\", \"tokens_to_generate\": 32}}'", flush=True)
    if not blocking:
        return url
    if threading.current_thread() is threading.main_thread():
        # `kill`, `ray job stop` and Kubernetes send SIGTERM: shut down as on Ctrl-C.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.delete(cfg.app_name)
        if not serve.status().applications:  # nothing else is served from this cluster
            serve.shutdown()
        ray.shutdown()
    return url
