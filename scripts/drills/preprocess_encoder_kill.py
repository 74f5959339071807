"""Fault drill: SIGKILL the CLIP encoder actor (Ray Data ActorPoolStrategy) in the middle of preprocessing.

A shapes set with `--images` training and 4 held-out images, four of the training images broken (two truncated
PNGs, one of random bytes, one missing), is preprocessed with the `test` preset's CLIP, batches of 4, one encoder
actor. When the driver has received `--kill-after` images, the encoder actor's process (found with the Ray state
API) gets SIGKILL. Ray Data restarts the actor and retries its batch (its actor pools default to max_restarts=-1
and max_task_retries=-1). Prints the images in, rows written, rows missing or duplicated, bad images reported (and
whether they are exactly the broken ones), the killed pid and the encoder's restarts.

    python scripts/drills/preprocess_encoder_kill.py            # about 30 s on 2 cores
    python scripts/drills/preprocess_encoder_kill.py --images 200 --kill-after 40
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drillkit import actors, local_ray, print_table

ENCODER = "MapWorker(MapBatches(ClipEncoder))"


@dataclass
class PreprocessDrill:
    """The drill's figures."""

    image_ids: set[int]
    """Every image the plan lists."""
    bad: dict[int, str]
    """image_id -> how it was broken."""
    killed_pid: int = 0
    images_at_kill: int = 0
    written_ids: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    """image_id -> reason, from the manifest."""
    encoder_pids: set = field(default_factory=set)
    encoder_restarts: int = 0
    seconds: float = 0.0

    @property
    def good_ids(self) -> set[int]:
        return self.image_ids - set(self.bad)

    @property
    def missing(self) -> int:
        return len(self.good_ids - set(self.written_ids))

    @property
    def duplicated(self) -> int:
        return sum(n - 1 for n in Counter(self.written_ids).values() if n > 1)


def break_images(shapes: Path) -> dict[int, str]:
    """Truncate two training images, overwrite one with random bytes, delete one; returns what was done."""
    train = shapes / "train2017"
    bad = {3: "truncated", 10: "truncated", 17: "random bytes", 24: "missing"}
    for image_id, how in bad.items():
        path = train / f"{image_id:012d}.png"
        if how == "truncated":
            path.write_bytes(path.read_bytes()[:300])
        elif how == "random bytes":
            path.write_bytes(np.random.default_rng(image_id).bytes(4096))
        else:
            path.unlink()
    return bad


class Killer:
    """The preprocessing log callback: on the first progress line past `after` images, SIGKILL the encoder."""

    def __init__(self, drill: PreprocessDrill, after: int):
        self.drill, self.after = drill, after

    def __call__(self, line: str) -> None:
        if self.drill.killed_pid or not line.startswith("encoded "):
            return
        done = int(line.split()[1].split("/")[0])
        if done < self.after:
            return
        encoders = actors(ENCODER)
        if len(encoders) != 1:
            raise RuntimeError(f"expected one live {ENCODER}, found {len(encoders)}")
        os.kill(encoders[0].pid, signal.SIGKILL)
        self.drill.killed_pid, self.drill.images_at_kill = encoders[0].pid, done


def run_drill(work: Path, images: int, kill_after: int) -> PreprocessDrill:
    """Write and break the shapes set, preprocess it while killing the encoder, read back what was written."""
    import pyarrow.parquet as pq

    from trimodal.config import load_config
    from trimodal.data.preprocess import PipelineOptions, build_plan, run_preprocess
    from trimodal.data.shapes.dataset import write_shapes_dataset

    shapes, out = work / "shapes", work / "data"
    write_shapes_dataset(shapes, n_train=images, n_val=4, seed=3)
    bad = break_images(shapes)
    plan = build_plan([shapes], [shapes / "llava_instruct.json"], log=lambda _: None)
    drill = PreprocessDrill({i.image_id for i in plan.images}, bad)
    options = PipelineOptions(batch_size=4, encoders=1, progress_every_s=0.0)
    start = time.perf_counter()
    manifest = run_preprocess(plan, load_config("test").model.vision, out, options, log=Killer(drill, kill_after))
    drill.seconds = time.perf_counter() - start
    drill.written_ids = pq.read_table(out / "images", columns=["image_id"])["image_id"].to_pylist()
    drill.skipped = {s["image_id"]: s["reason"] for s in manifest["skipped"]["images"]}
    encoders = actors(ENCODER, alive_only=False)
    drill.encoder_pids = {a.pid for a in encoders}
    drill.encoder_restarts = sum(a.num_restarts or 0 for a in encoders)
    return drill


def report(d: PreprocessDrill) -> None:
    """Print the figures."""
    reasons = [(f"  image {i}: reported as", reason[:72]) for i, reason in sorted(d.skipped.items())]
    print_table("preprocessing: CLIP encoder actor SIGKILLed mid-run", [
        ("images in (good + bad)", f"{len(d.image_ids)} ({len(d.good_ids)} + {len(d.bad)})"),
        ("killed encoder pid", d.killed_pid or "never killed"), ("images received before the kill", d.images_at_kill),
        ("encoder restarts (Ray state API)", d.encoder_restarts),
        ("encoder pid after the run", ", ".join(str(p) for p in sorted(d.encoder_pids))),
        ("embedding rows written", len(d.written_ids)), ("good images missing", d.missing),
        ("rows duplicated", d.duplicated),
        ("bad images reported", f"{len(d.skipped)} (exactly the bad ones: {set(d.skipped) == set(d.bad)})"),
        *reasons, ("wall s (preprocessing)", f"{d.seconds:.1f}")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100, help="training images (4 of them broken)")
    parser.add_argument("--kill-after", type=int, default=20, help="kill once this many images came back")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="drill-preprocess-") as tmp, local_ray(num_cpus=2):
        report(run_drill(Path(tmp), args.images, args.kill_after))


if __name__ == "__main__":
    main()
