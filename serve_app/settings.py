"""What the builder resolves before binding the graph: preset + overrides, the run, the environment. No Ray.

Environment (read once, here): TRIMODAL_PRESET (default cpu), TRIMODAL_RUN (a run's final/, or `none` for the
untrained projector; default the newest runs/**/final/run.json), TRIMODAL_API_KEY (optional bearer key),
TRIMODAL_ALLOWED_MEDIA_DOMAINS (comma list of hosts remote image URLs may come from).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from trimodal.config import TrimodalConfig, load_config
from trimodal.inference.media_fetch import parse_domains
from trimodal.inference.messages import MediaLimits
from trimodal.inference.openai_api import RequestLimits

from serve_app.ingress import IngressSettings

KNOWN_ARGS = ("preset", "run", "runs_dir", "device", "threads", "lm_cpus", "media_cpus", "ingress_cpus")


@dataclasses.dataclass
class AppSettings:
    """Everything the builder resolved; constructors get these values, nothing reads env inside a replica."""

    cfg: TrimodalConfig
    run_dir: str | None
    """The run's final/ directory (absolute), or None for the untrained projector."""
    run_note: str
    """How the run was chosen, for logs and /v1/models."""
    device: str = "cpu"
    threads: int | None = None
    """torch threads of the LanguageModel replica (Speech and Vision get half)."""
    lm_cpus: float = 1.0
    media_cpus: float = 0.25
    ingress_cpus: float = 0.25
    api_key: str | None = None
    allowed_media_domains: tuple[str, ...] = ()

    @property
    def media_threads(self) -> int:
        return max(1, (self.threads or 1) // 2)


def newest_run(runs_dir: str | Path = "runs") -> Path | None:
    """The newest finished run: the final/ directory whose run.json is newest under `runs_dir`."""
    found = sorted(Path(runs_dir).glob("**/final/run.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent.resolve() if found else None


def choose_run(arg: str | None, runs_dir: str | Path = "runs") -> tuple[str | None, str]:
    """(run directory or None, how it was chosen): a given path, `none`, or the newest finished run."""
    if arg and str(arg).lower() != "none":
        path = Path(arg).expanduser().resolve()
        if (path / "final" / "run.json").exists():
            path = path / "final"
        if not (path / "run.json").exists():
            raise FileNotFoundError(f"{path} is not a finished run (no run.json)")
        return str(path), f"run {path}"
    if arg:
        return None, "no run (TRIMODAL_RUN=none)"
    newest = newest_run(runs_dir)
    if newest is None:
        return None, f"no finished run under {Path(runs_dir).resolve()}"
    return str(newest), f"run {newest} (the newest finished run)"


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

    Keys with a dot are config overrides (`serving.max_batch_size=4`).
    """
    args = dict(args or {})
    env = os.environ if env is None else env
    unknown = [k for k in args if k not in KNOWN_ARGS and "." not in k]
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r} (known: {', '.join(KNOWN_ARGS)}, or a config key "
                         "such as serving.max_batch_size=4)")
    overrides = {k: _parse_value(v) for k, v in args.items() if "." in k}
    cfg = absolute_paths(load_config(args.get("preset") or env.get("TRIMODAL_PRESET") or "cpu", overrides))
    run_dir, note = choose_run(args.get("run") or env.get("TRIMODAL_RUN"), args.get("runs_dir", "runs"))
    threads = int(args["threads"]) if args.get("threads") is not None else (os.cpu_count() or 1)
    return AppSettings(cfg, run_dir, note, str(args.get("device", "cpu")), threads,
                       lm_cpus=float(args.get("lm_cpus", 1.0)), media_cpus=float(args.get("media_cpus", 0.25)),
                       ingress_cpus=float(args.get("ingress_cpus", 0.25)),
                       api_key=env.get("TRIMODAL_API_KEY") or None,
                       allowed_media_domains=parse_domains(env.get("TRIMODAL_ALLOWED_MEDIA_DOMAINS")))


def lm_hidden_size(cfg: TrimodalConfig) -> int:
    """Width of the LM's embeddings (the projector's output), read from its config, not its weights."""
    source = cfg.model.language_model.source
    if source.kind == "random":
        return cfg.model.language_model.random_shape.hidden_size
    from transformers import AutoConfig

    if source.kind == "hub":
        return AutoConfig.from_pretrained(source.name, revision=source.revision).hidden_size
    from trimodal.sources import resolve_source

    return AutoConfig.from_pretrained(resolve_source(source)).hidden_size


def ingress_settings(s: AppSettings) -> IngressSettings:
    """The ingress's view of the settings."""
    cfg, serving = s.cfg, s.cfg.serving
    return IngressSettings(
        model_id=f"trimodal-{cfg.name}", preset=cfg.name, run_dir=s.run_dir, run_note=s.run_note,
        limits=RequestLimits(serving.max_tokens_default, serving.max_tokens_limit),
        media=MediaLimits(serving.max_image_pixels, serving.max_images, cfg.model.speech.max_seconds),
        max_body_bytes=serving.max_body_bytes, request_timeout_s=serving.request_timeout_s,
        api_key=s.api_key, allowed_media_domains=s.allowed_media_domains,
        details={"api_key_required": bool(s.api_key), "max_batch_size": serving.max_batch_size})
