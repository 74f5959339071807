"""The models a chat request may name with `model`: the server's default run, the base model, and every finished
run of the server's preset under the runs directory. Plain Python (no Ray, no torch): the ingress owns one.

Ids (preset `cpu` shown):

- `trimodal-cpu`: the server's default run (TRIMODAL_RUN, else the newest finished run; the base model when there
  is none); a request without `model` gets it;
- `trimodal-cpu/base`: the language model without any adapter and the untrained projector seeded from the config,
  on the config's vision tower;
- `demo/finetune`, `demo/pretrain`, ...: a finished run by its directory relative to the runs directory (its
  `final/run.json` exists and it was trained with the server's preset; runs of another preset are not listed).

The two `trimodal-...` ids are reserved: a run directory of that name is not listed. An id that names no model
rescans the runs directory (at most once per `rescan_interval_s`), so a run that finished after the server
started is found without a restart; still unknown, it is `UnknownModel`. Clients see ids, never server paths.

A run whose files a replica could not load (`mark_broken`) is left out of the listing while its files stay as they
were (`run_fingerprint`: every file's path, size and modification time; re-exporting a run replaces final/ and so
changes them all, and so does rewriting one file by hand); asking for it meanwhile is `RunUnavailable`, with the
reason. Once its files change, the next scan lists it again and the next request loads it afresh.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from trimodal.inference.requests import RunBundle


class UnknownModel(LookupError):
    """A `model` that names neither the default, the base, nor a finished run of this preset."""


class RunUnavailable(Exception):
    """A finished run whose files cannot be loaded (a truncated adapter, a missing projector, ...); picklable, so a
    replica may hand it back through Serve."""

    def __init__(self, run: str, reason: str):
        super().__init__(run, reason)
        self.run = run
        """The run's client-visible name."""
        self.reason = reason
        """What is wrong, naming the file relative to the run's final/ directory (never a server path)."""

    def __str__(self) -> str:
        return (f"the run {self.run!r} cannot be loaded: {self.reason}; it is left out of /v1/models until its "
                "files change (re-export it)")


@dataclass(frozen=True)
class ModelEntry:
    """One id a client may ask for, and what answers it."""

    id: str
    run: RunBundle | None
    """The run, or None for the base model."""
    created: int
    """Unix time the run finished (run.json's mtime); the server's start for the base model."""
    fingerprint: tuple = ()
    """The run's files as they were when scanned (`run_fingerprint`); empty for the default and the base."""


def run_fingerprint(final_dir: Path) -> tuple:
    """(relative path, size, mtime ns) of every file under a run's final/, sorted: changes whenever a file does."""
    found = []
    for path in final_dir.rglob("*"):
        try:
            stat = path.stat()
        except OSError:  # removed while we looked
            continue
        if path.is_file():
            found.append((path.relative_to(final_dir).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


def run_preset(final_dir: Path) -> str | None:
    """The preset a finished run was trained with (run.json, else its config.yaml), None when it does not say."""
    try:
        meta = json.loads((final_dir / "run.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if isinstance(meta, dict) and meta.get("preset"):
        return str(meta["preset"])
    try:
        saved = yaml.safe_load((final_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return str(saved["name"]) if isinstance(saved, dict) and saved.get("name") else None


def finished_runs(runs_dir: str | Path = "runs") -> list[Path]:
    """Every finished run's final/ directory under `runs_dir`, oldest first (by its run.json)."""
    found = sorted(Path(runs_dir).glob("**/final/run.json"), key=lambda p: p.stat().st_mtime)
    return [p.parent.resolve() for p in found]


def run_name(final_dir: Path, runs_dir: str | Path = "runs") -> str:
    """`demo/finetune` for runs/demo/finetune/final: relative to the runs directory, else the run's own name."""
    run = final_dir.parent if final_dir.name == "final" else final_dir
    try:
        return run.relative_to(Path(runs_dir).resolve()).as_posix()
    except ValueError:
        return run.name


def run_bundle(final_dir: str | Path, name: str) -> RunBundle:
    """What the deployments need of a finished run: its final/ directory, its adapter (if any), its version."""
    path = Path(final_dir).resolve()
    adapter = path / "adapter"
    return RunBundle(name, str(path), str(adapter) if adapter.is_dir() else None,
                     (path / "run.json").stat().st_mtime_ns)


class RunRegistry:
    """The default run, the base model and the finished runs of one preset under one runs directory."""

    def __init__(self, runs_dir: str | Path | None, preset: str, default: RunBundle | None = None,
                 rescan_interval_s: float = 1.0):
        self.runs_dir = Path(runs_dir) if runs_dir else None
        self.preset = preset
        self.default = default
        self.default_id = f"trimodal-{preset}"
        self.base_id = f"trimodal-{preset}/base"
        self.rescan_interval_s = rescan_interval_s
        self.started = int(time.time())
        self._runs: dict[str, ModelEntry] = {}
        self._broken: dict[str, tuple[tuple, str]] = {}
        """Run name -> (its fingerprint when it failed to load, why): not listed while the fingerprint holds."""
        self._verified: set[tuple[str, tuple]] = set()
        """(run name, fingerprint) of runs the Vision deployment loaded (`mark_verified`)."""
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()

    def scan(self) -> None:
        """Read the runs directory again (a finished run of this preset: listed; anything else: not)."""
        runs: dict[str, ModelEntry] = {}
        for final in finished_runs(self.runs_dir) if self.runs_dir and self.runs_dir.is_dir() else []:
            name = run_name(final, self.runs_dir)
            if run_preset(final) not in (self.preset, None) or name in (self.default_id, self.base_id):
                continue
            try:
                bundle = run_bundle(final, name)
            except OSError:  # removed while we looked
                continue
            runs[name] = ModelEntry(name, bundle, bundle.version // 1_000_000_000, run_fingerprint(final))
        with self._lock:
            for name, (fingerprint, _) in list(self._broken.items()):
                if name in runs and runs[name].fingerprint == fingerprint:
                    del runs[name]  # still as it was when it failed
                else:
                    del self._broken[name]  # its files changed (or it is gone): try it again
            self._runs, self._scanned_at = runs, time.monotonic()

    def _scan_if_due(self) -> None:
        if time.monotonic() - self._scanned_at >= self.rescan_interval_s:
            self.scan()

    def entries(self) -> list[ModelEntry]:
        """The default, the base, then every run by name (rescanned when the last scan is older than the interval)."""
        self._scan_if_due()
        fixed = [ModelEntry(self.default_id, self.default, self._created(self.default)),
                 ModelEntry(self.base_id, None, self.started)]
        runs = dict(self._runs)
        if self.default is not None and self.default.name not in runs:  # a default run outside the runs directory
            runs[self.default.name] = ModelEntry(self.default.name, self.default, self._created(self.default))
        return fixed + [runs[name] for name in sorted(runs)]

    def resolve(self, model: str | None) -> ModelEntry:
        """The entry a request's `model` names (None or "": the default); UnknownModel when there is none."""
        if not model or model == self.default_id:
            return ModelEntry(self.default_id, self.default, self._created(self.default))
        if model == self.base_id:
            return ModelEntry(self.base_id, None, self.started)
        if self.default is not None and model == self.default.name:
            return ModelEntry(model, self.default, self._created(self.default))
        if model not in self._runs:
            self._scan_if_due()
        broken = self._broken.get(model)
        if broken is not None:
            raise RunUnavailable(model, broken[1])
        if model not in self._runs:
            raise UnknownModel(f"the model {model!r} does not exist: GET /v1/models lists the ids this server "
                               f"answers ({self.default_id}, {self.base_id}, and the finished runs of preset "
                               f"{self.preset!r})")
        return self._runs[model]

    def mark_broken(self, entry: ModelEntry, reason: str) -> None:
        """Leave a run that failed to load out of the listing until its files change (the default run and the base
        model stay: they are no run of the runs directory)."""
        if not entry.fingerprint:
            return
        with self._lock:
            self._broken[entry.id] = (entry.fingerprint, reason)
            self._runs.pop(entry.id, None)
            self._verified.discard((entry.id, entry.fingerprint))

    def verified(self, entry: ModelEntry) -> bool:
        """Whether this run, with these files, was loaded already (the default and the base always were)."""
        return not entry.fingerprint or (entry.id, entry.fingerprint) in self._verified

    def mark_verified(self, entry: ModelEntry) -> None:
        """Note that this run, with these files, loaded."""
        with self._lock:
            self._verified.add((entry.id, entry.fingerprint))

    def _created(self, run: RunBundle | None) -> int:
        return run.version // 1_000_000_000 if run is not None else self.started
