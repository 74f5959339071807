"""The one place that turns the plain classes into a Ray Serve deployment graph.

`build_app(args)` resolves the settings once (`serve_app.settings`: preset, overrides, run, environment), then
applies `serve.deployment` options (replicas, resources, request limits, batching) and binds Speech, Vision and
LanguageModel into the Ingress through its constructor.

    serve run serve_app:graph                                    # TRIMODAL_PRESET (cpu), newest finished run
    serve run serve_app:build_app preset=test run=runs/x/final   # args override the environment
    serve run serve_app:build_app preset=cpu serving.max_batch_size=4 threads=2
    serve deploy serve_app/serve_config.yaml                     # the same builder, its args from the file

HTTP host and port belong to Serve, not to an app: `serve run` binds 127.0.0.1:8000; use
`serve start --http-host/--http-port`, a config file's http_options, or `serve.start(http_options=
http_options(cfg))` for serving.host/port.

Settings the server cannot start with (a run trained with another preset, an unknown argument or preset) end
`serve run` with one line and exit status 1 before Ray starts; inside Ray (tests, `serve deploy`'s build task)
they are raised as exceptions.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Mapping

import ray
from ray import serve
from ray.serve.config import HTTPOptions
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from trimodal.config import ConfigError, TrimodalConfig
from trimodal.inference.vllm_engine import NO_TELEMETRY_ENV

from serve_app.ingress import Ingress
from serve_app.language_model import LanguageModel, VllmLanguageModel
from serve_app.settings import AppSettings, SettingsError, ingress_settings, lm_hidden_size, resolve_settings
from serve_app.speech import Speech
from serve_app.vision import Vision

BATCH_WAIT_S = {"Speech": 0.02, "Vision": 0.01, "LanguageModel": 0.02}
"""How long a replica waits to fill a batch after its first request arrives."""
GPU_SHARE = {"Speech": 0.1, "Vision": 0.1, "LanguageModel": 0.6}
"""Default fractions of one GPU when device=cuda (serve_config.yaml sets its own)."""
ROOT = Path(__file__).resolve().parents[1]
VLLM_ENV_VARS = ("VLLM_CACHE_ROOT", "VLLM_LOGGING_LEVEL", "TRIMODAL_CACHE", "HF_HOME", "HF_HUB_OFFLINE")
"""Environment variables the vllm replica inherits from the builder (when set); it also always gets
NO_TELEMETRY_ENV (no vLLM usage statistics, no Hugging Face telemetry), whatever the builder's environment says."""
RETRY_AFTER_S = 1
OVERLOAD_ERRORS = (BackPressureError, DeploymentUnavailableError)
"""What a handle call raises when a deployment cannot take the request: the ingress answers 503 + Retry-After."""
UNAVAILABLE_ERRORS = (RayActorError, ReplicaUnavailableError)
"""What a handle call raises when the replica serving it died (ActorDiedError, ActorUnavailableError): the ingress
answers 503 + Retry-After while Serve starts a replacement."""
INGRESS_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), "MALLOC_ARENA_MAX": "2"}
"""glibc settings for the Ingress, which holds request bodies of up to serving.max_body_bytes: a fixed mmap threshold
(setting it turns off glibc's dynamic threshold, which rises to the largest block freed) keeps every large body in
its own mapping, returned to the system when freed instead of kept in a heap arena, and two arenas instead of
eight per core cap what the request threads' arenas hold on to. glibc reads them at process start."""


def with_batching(cls: type, max_batch_size: int, wait_s: float) -> type:
    """A subclass whose single-item methods (cls.BATCHED) go through `serve.batch` on their list methods."""
    name = f"Batched{cls.__name__}"
    attrs: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": name}
    for single, many in cls.BATCHED.items():
        batch_fn = getattr(cls, many)
        attrs[many] = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)(batch_fn)
        attrs[single] = _stream_through(many) if inspect.isasyncgenfunction(batch_fn) else _call_through(many)
    return type(name, (cls,), attrs)


def _call_through(many: str):
    async def single(self, *args):  # serve.batch gathers each positional argument into a list
        return await getattr(self, many)(*args)
    return single


def _stream_through(many: str):
    async def single(self, *args):
        async for result in getattr(self, many)(*args):
            yield result
    return single


def servable_ingress(cls: type = Ingress) -> type:
    """The Ingress with Serve's late-bound ASGI hook: its Starlette app is built on the replica."""
    name = f"Served{cls.__name__}"
    attrs = {"__module__": cls.__module__, "__qualname__": name,
             "__serve_build_asgi_app__": lambda self: self.asgi_app()}
    return serve.ingress()(type(name, (cls,), attrs))


def _actor_options(settings: AppSettings, name: str, cpus: float) -> dict:
    options: dict[str, Any] = {"num_cpus": cpus, "runtime_env": {"env_vars": dict(NO_TELEMETRY_ENV)}}
    if settings.device.startswith("cuda"):
        options["num_gpus"] = GPU_SHARE[name]
    return options


def model_deployment(settings: AppSettings, cls: type, name: str, cpus: float, **extra: Any):
    """A model class as a Serve deployment: batching, request limits and resources from the settings."""
    serving = settings.cfg.serving
    batched = with_batching(cls, serving.max_batch_size, BATCH_WAIT_S[name])
    return serve.deployment(batched, name=name, ray_actor_options=_actor_options(settings, name, cpus),
                            max_ongoing_requests=serving.max_ongoing_requests,
                            max_queued_requests=serving.max_queued_requests, **extra)


def vllm_python(settings: AppSettings) -> Path:
    """The vllm environment's interpreter (serving.vllm.python, absolute or relative to the repository)."""
    python = Path(settings.cfg.serving.vllm.python).expanduser()
    return python if python.is_absolute() else ROOT / python


def check_vllm_python(settings: AppSettings) -> None:
    """SettingsError when the vllm environment is missing where the LanguageModel replica will run.

    On CPU the replica runs on this node, so the interpreter must be here. With device=cuda the replica is placed
    on a GPU node, which builds its own environment (cluster.yaml's worker setup) while the node building the app
    (a CPU head) has none: the check is left to Ray, which names the missing interpreter if the replica cannot
    start, and one line says so here.
    """
    python = vllm_python(settings)
    if python.exists():
        return
    if settings.device.startswith("cuda"):
        print(f"[serve_app] {python} is not on this node; the LanguageModel replica (device {settings.device}) "
              "uses the one its GPU node built (make install-vllm)", flush=True)
        return
    raise SettingsError(f"serving.engine=vllm needs the vllm environment ({python} is missing): run "
                        "`make install-vllm`, or serve with serving.engine=builtin")


def bind_vllm_lm(settings: AppSettings):
    """The LanguageModel on the vllm engine: its replica runs in the vllm environment (runtime_env py_executable);
    vLLM batches continuously, so no serve.batch."""
    serving = settings.cfg.serving
    env_vars = {**{name: os.environ[name] for name in VLLM_ENV_VARS if name in os.environ}, **NO_TELEMETRY_ENV}
    options = {**_actor_options(settings, "LanguageModel", settings.lm_cpus),
               "runtime_env": {"py_executable": str(vllm_python(settings)), "env_vars": env_vars}}
    lm = serve.deployment(VllmLanguageModel, name="LanguageModel", ray_actor_options=options,
                          num_replicas=serving.lm_replicas, max_ongoing_requests=serving.max_ongoing_requests,
                          max_queued_requests=serving.max_queued_requests)
    return lm.bind(settings.cfg, settings.run_dir, settings.device, settings.threads)


def bind_lm(settings: AppSettings):
    """The LanguageModel deployment, bound (tests bind one with test_token_delay_s behind a second ingress)."""
    if settings.cfg.serving.engine == "vllm" and settings.test_token_delay_s <= 0:
        return bind_vllm_lm(settings)
    lm = model_deployment(settings, LanguageModel, "LanguageModel", settings.lm_cpus,
                          num_replicas=settings.cfg.serving.lm_replicas)
    return lm.bind(settings.cfg, settings.run_dir, settings.device, settings.threads, settings.test_token_delay_s)


def build_graph(settings: AppSettings):
    """Bind Speech, Vision and LanguageModel into the Ingress, each with its Serve options."""
    cfg, device, threads = settings.cfg, settings.device, settings.media_threads
    speech = model_deployment(settings, Speech, "Speech", settings.media_cpus)
    vision = model_deployment(settings, Vision, "Vision", settings.media_cpus)
    return bind_ingress(settings, speech.bind(cfg, device, threads),
                        vision.bind(cfg, settings.run_dir, lm_hidden_size(cfg), device, threads), bind_lm(settings))


def bind_ingress(settings: AppSettings, speech, vision, lm):
    """The Ingress deployment bound to Speech, Vision and LanguageModel: bound deployments of this graph, or
    handles to those of another running application (a second front door sharing the model replicas)."""
    serving = settings.cfg.serving
    ingress = serve.deployment(servable_ingress(), name="Ingress",
                               ray_actor_options={"num_cpus": settings.ingress_cpus,
                                                  "runtime_env": {"env_vars": dict(INGRESS_MALLOC_ENV)}},
                               max_ongoing_requests=serving.max_ongoing_requests,
                               max_queued_requests=serving.max_queued_requests,
                               backpressure_config={"retry_after_s": RETRY_AFTER_S})
    return ingress.bind(speech, vision, lm, ingress_settings(settings), OVERLOAD_ERRORS, UNAVAILABLE_ERRORS)


def build_app(args: Mapping[str, Any] | None = None):
    """The application builder for `serve run serve_app:build_app key=value ...` and Serve config files (Serve calls
    it with exactly one argument, the `key=value` pairs or the config file's `args`; the environment is read)."""
    return build_app_with_env(args, None)


def build_app_with_env(args: Mapping[str, Any] | None, env: Mapping[str, str] | None):
    """`build_app` with an explicit environment mapping (None: os.environ); tests and drills pass their own."""
    try:
        settings = resolve_settings(args, env)
        if settings.cfg.serving.engine == "vllm":
            check_vllm_python(settings)
    except (SettingsError, ConfigError) as exc:
        if ray.is_initialized():
            raise
        raise SystemExit(f"[serve_app] cannot serve: {exc}") from None  # `serve run`: one line, exit status 1
    where = f" ({settings.run_dir})" if settings.run_dir else ""
    engine = settings.cfg.serving.engine
    print(f"[serve_app] preset {settings.cfg.name}, engine {engine}; {settings.run_note}{where}"
          f"{'; API key required' if settings.api_key else ''}", flush=True)
    return build_graph(settings)


def http_options(cfg: TrimodalConfig) -> HTTPOptions:
    """Serve's proxy options from the config: host (127.0.0.1 unless configured), port, a backstop timeout.

    The ingress enforces serving.request_timeout_s itself (504); the proxy's later timeout (408) is a backstop.
    """
    serving = cfg.serving
    return HTTPOptions(host=serving.host, port=serving.port, request_timeout_s=serving.request_timeout_s + 30)
