"""What the builder resolves before binding the graph: preset + overrides, the run, the environment. No Ray.

Environment (read once, here): TRIMODAL_PRESET (default cpu), TRIMODAL_RUN (a run's final/, or `none` for the
untrained projector; default the newest runs/**/final/run.json trained with the same preset), TRIMODAL_API_KEY
(optional bearer key), TRIMODAL_ALLOWED_MEDIA_DOMAINS (comma list of hosts remote image URLs may come from).

A run carries LoRA and projector weights shaped for the model of the preset it was trained with: a run given
explicitly with another preset is refused (SettingsError, one line naming both presets) before any replica starts.
Clients see a run's name (its directory relative to the runs directory), never a path on the server.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from trimodal.config import TrimodalConfig, load_config
from trimodal.inference.media_fetch import MediaSandbox, parse_domains
from trimodal.inference.messages import MediaLimits
from trimodal.inference.openai_api import RequestLimits
from trimodal.inference.requests import RunBundle, prompt_token_limit

from serve_app.ingress import IngressSettings
from serve_app.registry import finished_runs, run_bundle, run_name, run_preset

KNOWN_ARGS = ("preset", "run", "runs_dir", "device", "threads", "lm_cpus", "media_cpus", "ingress_cpus",
              "media_sandbox", "test_token_delay_s")
CHARS_PER_TOKEN = 128
"""A generous bound on the characters one token covers: the longest SmolLM2 token is 81 characters (a newline and
80 spaces), Phi-2's are shorter. Prompt text over max_prompt_tokens * CHARS_PER_TOKEN characters is therefore surely
over the token limit, and the ingress refuses it before any tokenizer runs (the LM checks the exact count)."""


class SettingsError(ValueError):
    """A setting the server cannot start with; its message is one line for the person who started it."""


@dataclasses.dataclass
class RunChoice:
    """The run the server loads: its final/ directory (absolute, for the replicas) and what clients are told."""

    directory: str | None
    """The run's final/ directory, or None for the untrained projector."""
    name: str | None
    """The run's name: its directory relative to the runs directory (or its own name); never a server path."""
    note: str
    """How it was chosen, naming the run, not its path."""


@dataclasses.dataclass
class AppSettings:
    """Everything the builder resolved; constructors get these values, nothing reads env inside a replica."""

    cfg: TrimodalConfig
    run_dir: str | None
    """The run's final/ directory (absolute), or None for the untrained projector."""
    run_note: str
    """How the run was chosen, for logs and /v1/models (no server paths)."""
    device: str = "cpu"
    threads: int | None = None
    """torch threads of the LanguageModel replica (Speech and Vision get half)."""
    lm_cpus: float = 1.0
    media_cpus: float = 0.25
    ingress_cpus: float = 0.25
    api_key: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    run_name: str | None = None
    """The run's name shown to clients."""
    media_sandbox: MediaSandbox | None = None
    """Tests and drills: a resolver table and a recording loopback-only transport for remote image URLs."""
    test_token_delay_s: float = 0.0
    """Tests: the LanguageModel answers with a SteadyGenerator (one token per this many seconds) when > 0."""
    runs_dir: str = "runs"
    """The directory whose finished runs clients may choose with `model` (absolute once resolved)."""

    @property
    def media_threads(self) -> int:
        return max(1, (self.threads or 1) // 2)


def newest_run(runs_dir: str | Path = "runs", preset: str | None = None) -> Path | None:
    """The newest finished run under `runs_dir` (trained with `preset`, when given; unknown presets match)."""
    runs = [r for r in finished_runs(runs_dir) if preset is None or run_preset(r) in (preset, None)]
    return runs[-1] if runs else None


def choose_run(arg: str | None, runs_dir: str | Path = "runs", preset: str | None = None) -> RunChoice:
    """A given path (refused when trained with another preset), `none`, or the newest run trained with `preset`."""
    if arg and str(arg).lower() != "none":
        return given_run(Path(arg).expanduser().resolve(), runs_dir, preset)
    if arg:
        return RunChoice(None, None, "no run (TRIMODAL_RUN=none)")
    newest = newest_run(runs_dir, preset)
    if newest is None:
        others = sorted({run_preset(r) or "?" for r in finished_runs(runs_dir)})
        but = f" (only runs of preset {', '.join(others)})" if others else ""
        return RunChoice(None, None, f"no finished run of preset {preset} under the runs directory{but}"
                         if preset else "no finished run under the runs directory")
    name = run_name(newest, runs_dir)
    return RunChoice(str(newest), name, f"run {name} (the newest finished run)")


def given_run(path: Path, runs_dir: str | Path, preset: str | None) -> RunChoice:
    """A run named explicitly: it must be finished, and trained with `preset` (when both say)."""
    if (path / "final" / "run.json").exists():
        path = path / "final"
    if not (path / "run.json").exists():
        raise SettingsError(f"{path} is not a finished run (no run.json)")
    trained_with = run_preset(path)
    if preset and trained_with and trained_with != preset:
        raise SettingsError(f"run {path} was trained with preset {trained_with!r} but the server's preset is "
                            f"{preset!r}: serve it with preset={trained_with} (TRIMODAL_PRESET={trained_with}), or "
                            f"pick a run trained with {preset!r}")
    name = run_name(path, runs_dir)
    return RunChoice(str(path), name, f"run {name}")


def absolute_paths(cfg: TrimodalConfig) -> TrimodalConfig:
    """Make `path` model sources absolute: replicas may not share the driver's working directory."""
    for source in (cfg.model.language_model.source, cfg.model.vision.source, cfg.model.speech.source):
        if source.kind == "path":
            source.name = str(Path(source.name).expanduser().resolve())
    return cfg


def _parse_value(value: Any) -> Any:
    return yaml.safe_load(value) if isinstance(value, str) else value


def resolve_settings(args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> AppSettings:
    """Args (`serve run ... key=value`, or a config file's `args`) over the environment over the defaults.

    Keys with a dot are config overrides (`serving.max_batch_size=4`). SettingsError for what cannot be served.
    """
    args = dict(args or {})
    env = os.environ if env is None else env
    unknown = [k for k in args if k not in KNOWN_ARGS and "." not in k]
    if unknown:
        raise SettingsError(f"unknown argument {unknown[0]!r} (known: {', '.join(KNOWN_ARGS)}, or a config key "
                            "such as serving.max_batch_size=4)")
    overrides = {k: _parse_value(v) for k, v in args.items() if "." in k}
    cfg = absolute_paths(load_config(args.get("preset") or env.get("TRIMODAL_PRESET") or "cpu", overrides))
    runs_dir = str(Path(args.get("runs_dir", "runs")).expanduser().resolve())
    run = choose_run(args.get("run") or env.get("TRIMODAL_RUN"), runs_dir, cfg.name)
    threads = int(args["threads"]) if args.get("threads") is not None else (os.cpu_count() or 1)
    return AppSettings(cfg, run.directory, run.note, str(args.get("device", "cpu")), threads,
                       lm_cpus=float(args.get("lm_cpus", 1.0)), media_cpus=float(args.get("media_cpus", 0.25)),
                       ingress_cpus=float(args.get("ingress_cpus", 0.25)),
                       api_key=env.get("TRIMODAL_API_KEY") or None,
                       allowed_media_domains=parse_domains(env.get("TRIMODAL_ALLOWED_MEDIA_DOMAINS")),
                       run_name=run.name, media_sandbox=media_sandbox(args.get("media_sandbox")),
                       test_token_delay_s=float(args.get("test_token_delay_s", 0.0)), runs_dir=runs_dir)


def media_sandbox(value: Any) -> MediaSandbox | None:
    """`media_sandbox={record: FILE, hosts: {name: [address, ...]}}` (a mapping, or that mapping as YAML text)."""
    value = _parse_value(value)
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("record"), str):
        raise SettingsError("media_sandbox must be a mapping {record: FILE, hosts: {name: [address, ...]}}")
    hosts = value.get("hosts") or {}
    if not isinstance(hosts, dict) or not all(isinstance(a, list) for a in hosts.values()):
        raise SettingsError("media_sandbox.hosts must map host names to lists of addresses")
    return MediaSandbox(value["record"], {str(h): tuple(map(str, a)) for h, a in hosts.items()})


def lm_hidden_size(cfg: TrimodalConfig) -> int:
    """Width of the LM's embeddings (the projector's output), read from its config, not its weights."""
    if cfg.model.language_model.source.kind == "random":
        return cfg.model.language_model.random_shape.hidden_size
    return _lm_config(cfg).hidden_size


def lm_context_length(cfg: TrimodalConfig) -> int | None:
    """Positions the LM reads (max_position_embeddings; Phi-2: 2,048), read from its config, not its weights."""
    if cfg.model.language_model.source.kind == "random":
        from trimodal.models.language import RANDOM_LM_POSITIONS

        return RANDOM_LM_POSITIONS
    return getattr(_lm_config(cfg), "max_position_embeddings", None)


def _lm_config(cfg: TrimodalConfig):
    from transformers import AutoConfig

    source = cfg.model.language_model.source
    if source.kind == "hub":
        return AutoConfig.from_pretrained(source.name, revision=source.revision)
    from trimodal.weights.sources import resolve_source

    return AutoConfig.from_pretrained(resolve_source(source))


def default_bundle(settings: AppSettings) -> RunBundle | None:
    """The server's default run as the deployments take it (None: no run, the base model)."""
    return run_bundle(settings.run_dir, settings.run_name or "") if settings.run_dir else None


def ingress_settings(settings: AppSettings) -> IngressSettings:
    """The ingress's view of the settings."""
    cfg, serving = settings.cfg, settings.cfg.serving
    prompt_tokens = prompt_token_limit(cfg, lm_context_length(cfg))
    return IngressSettings(
        model_id=f"trimodal-{cfg.name}", preset=cfg.name, run_name=settings.run_name, run_note=settings.run_note,
        runs_dir=settings.runs_dir, default_run=default_bundle(settings),
        max_prompt_tokens=prompt_tokens, max_prompt_chars=prompt_tokens * CHARS_PER_TOKEN,
        media_sandbox=settings.media_sandbox,
        limits=RequestLimits(serving.max_tokens_default, serving.max_tokens_limit),
        media=MediaLimits(serving.max_image_pixels, serving.max_images, cfg.model.speech.max_seconds),
        max_body_bytes=serving.max_body_bytes, request_timeout_s=serving.request_timeout_s,
        api_key=settings.api_key, allowed_media_domains=settings.allowed_media_domains,
        details={"api_key_required": bool(settings.api_key), "max_batch_size": serving.max_batch_size})
