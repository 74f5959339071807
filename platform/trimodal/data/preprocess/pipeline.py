"""The Ray Data pipeline of the image pass: decode in parallel tasks, encode in a fixed pool of CLIP actors.

    from_pandas(one block per batch of image records)
      -> map_batches(decode_images)    parallel Ray tasks: read, decode, CLIP resize/crop/normalise
      -> map_batches(ClipEncoder)      fixed actor pool, the tower loaded once per actor: float16 patch features

An unreadable image (missing, truncated, not an image) flows through as a row with an `error` and no features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from trimodal.config import ModelSource, VisionConfig
from trimodal.data.preprocess.plan import ImageRecord, PreprocessError


def load_image(path: str) -> tuple[Image.Image | None, str]:
    """Open and fully decode an image; returns (image, "") or (None, reason). Never raises for bad files."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "missing file"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    if not data:
        return None, "empty file"
    try:
        image = Image.open(BytesIO(data))
        image.load()
    except Image.DecompressionBombError as e:
        return None, f"too large: {e}"
    except UnidentifiedImageError:
        return None, "not an image (unrecognised format)"
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data; none may stop the run
        return None, f"corrupt or truncated image ({type(e).__name__}: {e})"
    return image, ""


def decode_images(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: image records -> pixel_values [B, 3, S, S] float32 (CLIP-normalised), width, height and
    error ("" when decoded; rows that failed keep zeros)."""
    from trimodal.models.vision import preprocess_images

    n = len(batch["image_id"])
    pixels = np.zeros((n, 3, image_size, image_size), np.float32)
    widths, heights = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors = np.empty(n, dtype=object)
    good: list[int] = []
    images: list[Image.Image] = []
    for i, path in enumerate(batch["path"]):
        image, errors[i] = load_image(str(path))
        if image is not None:
            good.append(i)
            images.append(image)
            widths[i], heights[i] = image.size
    if images:
        pixels[good] = preprocess_images(images, image_size).numpy()
    out = {k: batch[k] for k in ("image_id", "file_name", "split", "path")}
    return {**out, "width": widths, "height": heights, "error": errors, "pixel_values": pixels}


class ClipEncoder:
    """Ray Data actor: loads the vision tower once, then turns pixel batches into float16 patch features."""

    def __init__(self, vision: VisionConfig, directory: str | None, use_gpu: bool):
        import torch

        from trimodal.models.vision import load_vision_tower

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.tower = load_vision_tower(vision, directory=directory, device=self.device)
        self.shape = (self.tower.info.num_patches, self.tower.info.hidden_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = batch["error"] == ""
        embedding = np.zeros((len(ok), *self.shape), np.float16)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"][ok])).to(self.device)
            embedding[ok] = self.tower(pixels).float().cpu().numpy().astype(np.float16)
        keep = ("image_id", "file_name", "split", "path", "width", "height", "error")
        return {**{k: batch[k] for k in keep}, "embedding": embedding}


@dataclass(frozen=True)
class PipelineOptions:
    """How the image pass runs."""

    batch_size: int = 32
    """Images per decode task and per CLIP forward pass."""
    encoders: int = 1
    """Size of the encoder actor pool."""
    gpus_per_encoder: float = 0.0
    """GPUs reserved per encoder actor (fractions share a GPU)."""
    cpus_per_encoder: float = 1.0
    """CPUs reserved per encoder actor; see `default_cpus_per_encoder`."""
    progress_every_s: float = 10.0
    """Seconds between progress lines."""

    def validate(self) -> "PipelineOptions":
        if self.batch_size < 1 or self.encoders < 1:
            raise PreprocessError(f"--batch-size and --encoders must be >= 1, got {self.batch_size}, {self.encoders}")
        if self.gpus_per_encoder < 0 or self.cpus_per_encoder <= 0:
            raise PreprocessError("--gpus-per-encoder must be >= 0 and CPUs per encoder > 0")
        return self


def default_cpus_per_encoder(cluster_cpus: float, encoders: int, gpus_per_encoder: float) -> float:
    """One CPU per encoder, but on a small CPU-only machine leave one CPU free for the decode tasks (a pool that
    reserved every CPU would starve them and the pipeline would stall)."""
    if gpus_per_encoder > 0 or cluster_cpus - encoders >= 1:
        return 1.0
    return max(0.25, (cluster_cpus - 1) / encoders)


def pin_vision(vision: VisionConfig, directory: str | Path | None) -> tuple[VisionConfig, str | None]:
    """The (config, directory) pair that loads the same tower on every worker, whatever its working directory:
    a relative `path` source becomes absolute, and a missing one with `fallback_to_random` becomes `random`."""
    if directory is not None:
        path = Path(directory).resolve()
        if not (path / "config.json").is_file():
            raise PreprocessError(f"--vision {directory}: not a CLIP model directory (no config.json)")
        return vision, str(path)
    if vision.source.kind != "path":
        return vision, None
    path = Path(vision.source.name).resolve()
    if path.exists() or not vision.fallback_to_random:
        return replace(vision, source=replace(vision.source, name=str(path))), None
    return replace(vision, source=ModelSource(kind="random", name=vision.source.name), fallback_to_random=False), None


def image_blocks(images: Sequence[ImageRecord], batch_size: int) -> "ray.data.Dataset":  # noqa: F821
    """A dataset of image records with one block per batch, so each decode task and each CLIP forward pass sees
    the same images on every run (float results depend on batch composition)."""
    import pandas as pd
    import ray.data

    rows = [asdict(image) for image in images]
    frames = [pd.DataFrame(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return ray.data.from_pandas(frames)


def decode_memory(batch_size: int, image_size: int) -> int:
    """Heap bytes a decode task reserves: the worker itself (torch is imported), and per image its float32
    pixels (twice, for the copy) and room for a decoded source image. Reserving it also keeps Ray Data from
    fusing the decode tasks into the encoder actors (it fuses a task map into an actor map only when their
    remote arguments match)."""
    return (512 << 20) + batch_size * (2 * 3 * image_size * image_size * 4 + (4 << 20))


def embedding_pipeline(images: Sequence[ImageRecord], vision: VisionConfig, directory: str | None,
                       image_size: int, options: PipelineOptions) -> "ray.data.Dataset":  # noqa: F821
    """Decode in tasks, encode in a fixed actor pool; rows keep their order (image_id).

    Ray Data restarts a killed encoder actor and retries its batch (its actor pools default to max_restarts=-1,
    max_task_retries=-1), so no row is lost when an actor dies mid-run."""
    import ray.data

    decoded = image_blocks(images, options.batch_size).map_batches(
        decode_images, batch_size=None, batch_format="numpy", fn_kwargs={"image_size": image_size},
        num_cpus=1, memory=decode_memory(options.batch_size, image_size), udf_modifying_row_count=False)
    # Ray Data refuses GPU actors without a batch size; blocks hold batch_size rows, so a batch is still one block.
    return decoded.map_batches(
        ClipEncoder, batch_size=options.batch_size if options.gpus_per_encoder > 0 else None, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.encoders),
        fn_constructor_kwargs={"vision": vision, "directory": directory, "use_gpu": options.gpus_per_encoder > 0},
        num_cpus=options.cpus_per_encoder, num_gpus=options.gpus_per_encoder, udf_modifying_row_count=False)


def tower_info(vision: VisionConfig, directory: str | None) -> Any:
    """Load the tower once on the driver: fails fast on a bad directory and gives the manifest its shape."""
    from trimodal.models.vision import load_vision_tower

    return load_vision_tower(vision, directory=directory).info
