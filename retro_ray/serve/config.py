"""ServeConfig: how the HTTP generation service runs (``retro-ray serve``, ``serve run``, a RayService).

Kept apart from ``app.py`` so that reading or printing it (``--help``) imports neither Ray Serve nor
torch. Every field can be given as an application argument (``serve run retro_ray.serve.app:build_app
project_dir=... checkpoint=... max_batch_size=16``) or under ``args:`` of a Serve config file.
"""

from __future__ import annotations

from dataclasses import field

from retro_ray import config as C
from retro_ray.errors import RetroRayError

INDEX_MODES = ("local", "sharded", "none")


@C.config_class
class ServeConfig:
    host: str = field(
        default="127.0.0.1",
        metadata=C.doc("Address the HTTP proxy listens on (retro-ray serve only; 0.0.0.0 = every interface). "
                       "A Serve config file sets it under http_options instead."),
    )
    port: int = field(default=8000, metadata=C.doc("HTTP port (retro-ray serve only; a Serve config file sets http_options.port)."))
    route_prefix: str = field(default="/", metadata=C.doc("URL prefix of every endpoint, e.g. /retro."))
    app_name: str = field(default="retro", metadata=C.doc("Name of the Serve application (serve status, serve delete)."))
    model_name: str | None = field(
        default=None,
        metadata=C.doc("Model name served by /v1/models and checked in /v1/completions; empty = the generator's own name."),
    )
    device: str = field(default="auto", metadata=C.doc("auto | cpu | cuda: where the generator and embedder replicas run the models."))
    index: str = field(
        default="local",
        metadata=C.doc("local = the merged Faiss index inside each generator replica; sharded = the stage-2 IndexShard "
                       "actors (one per saved shard); none = no retrieval (requests must give their neighbours)."),
    )
    max_batch_size: int = field(
        default=8, metadata=C.doc("Most requests decoded together in one batch by a generator replica (@serve.batch).")
    )
    batch_wait_timeout_s: float = field(
        default=0.01, metadata=C.doc("How long a generator replica waits for a batch to fill before decoding a partial one.")
    )
    min_replicas: int = field(default=1, metadata=C.doc("Autoscaling: fewest generator replicas."))
    max_replicas: int = field(default=2, metadata=C.doc("Autoscaling: most generator replicas."))
    target_ongoing_requests: float = field(
        default=8.0,
        metadata=C.doc("Autoscaling: requests in flight per generator replica that the autoscaler aims for "
                       "(about max_batch_size keeps each replica's batches full)."),
    )
    generator_num_cpus: float = field(
        default=0.5, metadata=C.doc("Ray CPUs reserved per generator replica (fractions let the app fit a 2-CPU laptop).")
    )
    generator_num_gpus: float = field(default=0.0, metadata=C.doc("GPUs per generator replica; 0 = CPU."))
    embedder_num_cpus: float = field(default=0.25, metadata=C.doc("Ray CPUs reserved by the embedder replica."))
    embedder_num_gpus: float = field(default=0.0, metadata=C.doc("GPUs per embedder replica; 0 = CPU."))
    ingress_num_cpus: float = field(default=0.1, metadata=C.doc("Ray CPUs reserved by the HTTP ingress replica."))
    max_prompt_tokens: int = field(default=1024, metadata=C.doc("Longest prompt accepted, in GPT tokens; longer ones get 400."))
    max_tokens_to_generate: int = field(
        default=512, metadata=C.doc("Largest tokens_to_generate (max_tokens on /v1/completions) accepted; more gets 400.")
    )
    max_prompts_per_request: int = field(default=8, metadata=C.doc("Most prompts in one request; more gets 400."))
    auth_token_env: str = field(
        default="RETRO_RAY_API_TOKEN",
        metadata=C.doc("Environment variable holding the bearer token. When it is set (where the app is built, or in "
                       "the ingress replica's environment), every endpoint but /health needs 'Authorization: Bearer <token>'."),
    )

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise RetroRayError(msg)

        need(self.index in INDEX_MODES, f"serve index={self.index!r} is not one of {', '.join(INDEX_MODES)}.")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"serve device={self.device!r}; use auto, cpu or cuda.")
        need(1 <= self.port <= 65535, f"serve port={self.port} is not a TCP port (1-65535).")
        need(self.route_prefix.startswith("/"), f"serve route_prefix={self.route_prefix!r} must start with '/'.")
        need(self.max_batch_size >= 1, f"serve max_batch_size={self.max_batch_size}; it must be at least 1.")
        need(self.batch_wait_timeout_s >= 0, f"serve batch_wait_timeout_s={self.batch_wait_timeout_s}; it must be >= 0.")
        need(0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1,
             f"serve min_replicas={self.min_replicas}, max_replicas={self.max_replicas}; "
             "need 0 <= min_replicas <= max_replicas and max_replicas >= 1.")
        need(self.target_ongoing_requests > 0, "serve target_ongoing_requests must be > 0.")
        for name in ("generator_num_cpus", "generator_num_gpus", "embedder_num_cpus", "embedder_num_gpus", "ingress_num_cpus"):
            need(getattr(self, name) >= 0, f"serve {name}={getattr(self, name)}; it must be >= 0.")
        for name in ("max_prompt_tokens", "max_tokens_to_generate", "max_prompts_per_request"):
            need(getattr(self, name) >= 1, f"serve {name}={getattr(self, name)}; it must be at least 1.")
        need(bool(self.auth_token_env), "serve auth_token_env is empty; name an environment variable (e.g. RETRO_RAY_API_TOKEN).")
