"""`mambart serve-ray`: the OpenAI server of `mambart serve` as Ray Serve replicas (issue 17).

Scale-out on an existing engine, not a home-made one: each replica is a Ray actor that loads the
model (its own Generator and continuous-batching engine) and serves the same FastAPI app as
`mambart serve` (serve.create_app); Ray's HTTP proxy spreads requests over the replicas, and
Ray's autoscaler adds or removes replicas from the requests in flight.

    mambart serve-ray MODEL --replicas 2                    # a local Ray instance
    RAY_ADDRESS=auto mambart serve-ray MODEL --min-replicas 1 --max-replicas 8
    serve run mambart.serve_ray:build_app model=MODEL replicas=2   # Ray's own CLI / config file

Needs the `ray` extra (pip install "mambart[ray]"). docs/serving.md shows a multi-node config.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from typing import Optional

from ray import serve

from .serve import ServeConfig


@serve.ingress()
class MambartServer:
    """One replica: a Generator and the OpenAI app over it (built after the constructor)."""

    def __init__(self, model: str, config: dict, device: str = "cpu",
                 dtype: Optional[str] = None, revision: Optional[str] = None,
                 tokenizer: Optional[str] = None, prompt_cache_mb: int = 1024):
        from .generator import Generator
        from .serve import ServerState

        gen = Generator(model, device=device, dtype=dtype, revision=revision,
                        tokenizer=tokenizer, prompt_cache_bytes=int(prompt_cache_mb) << 20)
        self._state = ServerState(gen, ServeConfig(**config))

    def __serve_build_asgi_app__(self):
        from .serve import create_app

        return create_app(self._state)


def application(model: str, cfg: ServeConfig, *, device: str = "cpu",
                dtype: Optional[str] = None, revision: Optional[str] = None,
                tokenizer: Optional[str] = None, prompt_cache_mb: int = 1024,
                replicas: int = 1, min_replicas: Optional[int] = None,
                max_replicas: Optional[int] = None, target_ongoing: float = 32.0,
                num_cpus: float = 1.0, num_gpus: Optional[float] = None):
    """The bound Ray Serve application: `replicas` fixed replicas, or Ray's autoscaling between
    min_replicas and max_replicas (starting at `replicas`) aiming at `target_ongoing` requests
    in flight per replica. A replica takes up to max_running + max_queue requests (its engine's
    429 applies beyond), and gets drain_timeout seconds to finish them when it is stopped."""
    if num_gpus is None:
        num_gpus = 1.0 if device.startswith("cuda") else 0.0
    opts = dict(name="mambart", ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                max_ongoing_requests=cfg.max_running + cfg.max_queue,
                graceful_shutdown_timeout_s=max(cfg.drain_timeout, 1.0),
                health_check_period_s=10.0)
    if max_replicas is not None:
        lo = replicas if min_replicas is None else min_replicas
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": max_replicas,
                                      "initial_replicas": max(lo, min(replicas, max_replicas)),
                                      "target_ongoing_requests": target_ongoing}
    else:
        opts["num_replicas"] = replicas
    dep = serve.deployment(MambartServer, **opts)
    return dep.bind(model, dataclasses.asdict(cfg), device, dtype, revision, tokenizer,
                    prompt_cache_mb)


def build_app(args: dict):
    """Ray Serve's application builder (`serve run mambart.serve_ray:build_app model=M ...`, or
    a config file's import_path). Keys: model (required), served_model_name, device, dtype,
    tokenizer, chat_template (a file), api_key, max_running, max_queue, max_tokens,
    max_prompt_tokens, prompt_cache_mb, drain_timeout, replicas, min_replicas, max_replicas,
    target_ongoing_requests, num_cpus, num_gpus."""
    a = dict(args)
    if "model" not in a:
        raise ValueError("build_app: give model=MODEL")
    model = str(a.pop("model"))
    template = a.pop("chat_template", None)
    if template is not None:
        from .chat_template import find_chat_template

        template = find_chat_template(None, {}, template)

    def num(key, kind, default):
        return kind(a.pop(key)) if key in a else default

    cfg = ServeConfig(model_name=str(a.pop("served_model_name", model)),
                      max_prompt_tokens=num("max_prompt_tokens", int, 32768),
                      max_tokens=num("max_tokens", int, 4096),
                      max_running=num("max_running", int, 256),
                      max_queue=num("max_queue", int, 256),
                      api_key=a.pop("api_key", None) or os.environ.get("MAMBART_API_KEY"),
                      chat_template=template,
                      drain_timeout=num("drain_timeout", float, 30.0))
    kw = dict(device=str(a.pop("device", "cpu")), dtype=a.pop("dtype", None),
              revision=a.pop("revision", None), tokenizer=a.pop("tokenizer", None),
              prompt_cache_mb=num("prompt_cache_mb", int, 1024),
              replicas=num("replicas", int, 1), min_replicas=num("min_replicas", int, None),
              max_replicas=num("max_replicas", int, None),
              target_ongoing=num("target_ongoing_requests", float, 32.0),
              num_cpus=num("num_cpus", float, 1.0), num_gpus=num("num_gpus", float, None))
    if a:
        raise ValueError(f"build_app: unknown arguments {sorted(a)}")
    return application(model, cfg, **kw)


def run_ray(model: str, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
            **kw) -> int:
    """`mambart serve-ray`: starts (or joins, with RAY_ADDRESS) Ray, runs the application
    behind Ray's HTTP proxy on host:port, and waits; SIGTERM / SIGINT shut Serve down (each
    replica gets drain_timeout seconds for its requests) and exit 0."""
    import ray

    if port == 0:
        from .serve import bind

        s = bind(host, 0)
        port = s.getsockname()[1]
        s.close()
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(model, cfg, **kw), name="mambart", route_prefix="/")
        sys.stderr.write(f"mambart serve-ray: {cfg.model_name} on http://{host}:{port}/v1 "
                         f"(Ray Serve)\n")
        sys.stderr.flush()
        while not stop.wait(1.0):
            pass
        sys.stderr.write("mambart serve-ray: shutting down (draining the replicas)\n")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
