"""Benchmark: images/s of the Ray Data preprocessing pipeline vs a plain single-process loop.

Same images (a generated shapes set), same model (a seeded random CLIP vision tower at the TinyCLIP-ViT-61M/32
shape: 224 px, patch 32 -> 49 patches, width 640, 12 layers, 10 heads, MLP 2560), same batch size, same
float16 output. The loop decodes, preprocesses and encodes batch after batch in this process (torch using every
core); the pipeline is `trimodal.data.preprocess.images.encode_images` (decode tasks -> encoder actor pool -> Parquet).
Both timings include loading the model (the pipeline's excludes `ray.init`, a one-off per cluster). Prints a
table with both numbers and the ratio.

    python bench/preprocess.py --images 256 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from trimodal.config import ModelSource, TinyCLIPShape, VisionConfig
from trimodal.data.preprocess import PipelineOptions, Plan, build_plan, default_cpus_per_encoder
from trimodal.data.preprocess.images import encode_images
from trimodal.data.preprocess.pipeline import load_image, tower_info
from trimodal.data.shapes.dataset import write_shapes_dataset

# TinyCLIP-ViT-61M/32: 12 x (4 * 640^2 + 2 * 640 * 2560) ~ 59M weights in the blocks + embeddings ~ 61M.
TINYCLIP_61M = VisionConfig(
    source=ModelSource(kind="random", name="tinyclip-vit-61m-32-shape"), image_size=224,
    random_shape=TinyCLIPShape(hidden_size=640, num_layers=12, num_heads=10, patch_size=32,
                               text_hidden_size=320, text_num_layers=1),
)


def plain_loop(plan: Plan, vision: VisionConfig, batch_size: int) -> tuple[float, np.ndarray]:
    """Decode + preprocess + encode in this process, batch after batch. Returns (seconds, embeddings)."""
    import torch

    from trimodal.models.vision import load_vision_tower, preprocess_images

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    tower = load_vision_tower(vision)
    out = []
    for i in range(0, len(plan.images), batch_size):
        images = [load_image(record.path)[0] for record in plan.images[i : i + batch_size]]
        pixels = preprocess_images([im for im in images if im is not None], vision.image_size)
        out.append(tower(pixels).float().numpy().astype(np.float16))
    return time.perf_counter() - start, np.concatenate(out)


def ray_pipeline(plan: Plan, vision: VisionConfig, options: PipelineOptions, out: Path) -> tuple[float, np.ndarray]:
    """The library's image pass into `out`/images. Returns (seconds, embeddings in image_id order)."""
    import pyarrow.parquet as pq

    start = time.perf_counter()
    encode_images(plan, vision, None, out, options, tower_info(vision, None), log=lambda m: None)
    seconds = time.perf_counter() - start
    table = pq.read_table(out / "images", columns=["image_id", "embedding"]).sort_by("image_id")
    embeddings = table["embedding"].combine_chunks().to_numpy()
    return seconds, embeddings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images to encode (default 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoders", type=int, default=None, help="actor pool size (default: one per core)")
    parser.add_argument("--data", default=None, help="shapes directory to (re)use (default: a temporary one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.data.extensions  # noqa: F401 - registers the tensor type for reading the Parquet back

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or Path(tmp) / "shapes")
        write_shapes_dataset(data, n_train=args.images, n_val=0, seed=0)
        plan = build_plan([data], log=lambda m: None)
        loop_s, loop_emb = plain_loop(plan, TINYCLIP_61M, args.batch_size)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1")
        encoders = args.encoders or cores
        options = PipelineOptions(batch_size=args.batch_size, encoders=encoders,
                                  cpus_per_encoder=default_cpus_per_encoder(cores, encoders, 0.0))
        ray_s, ray_emb = ray_pipeline(plan, TINYCLIP_61M, options, Path(tmp) / "out")
        ray.shutdown()
    print_table(len(plan.images), args.batch_size, cores, encoders, loop_s, ray_s)
    diff = np.abs(loop_emb.astype(np.float32) - ray_emb.astype(np.float32)).max()
    print(f"same embeddings: {np.array_equal(loop_emb, ray_emb)} (max abs difference {diff:.3g})")


def print_table(n: int, batch_size: int, cores: int, encoders: int, loop_s: float, ray_s: float) -> None:
    print(f"\n{n} shapes images, 224 px, random CLIP at TinyCLIP-ViT-61M/32 shape [49, 640], batch {batch_size}, "
          f"{cores} CPU cores, float32 compute, float16 output; wall time includes model loading")
    print(f"| {'method':<52} | {'wall s':>6} | {'images/s':>8} | {'ratio':>5} |")
    print(f"|{'-' * 54}|{'-' * 8}|{'-' * 10}|{'-' * 7}|")
    for name, seconds in ((f"plain loop, 1 process ({cores} torch threads)", loop_s),
                          (f"Ray Data: decode tasks + {encoders} encoder actors + Parquet", ray_s)):
        print(f"| {name:<52} | {seconds:>6.1f} | {n / seconds:>8.1f} | {loop_s / seconds:>5.2f} |")


if __name__ == "__main__":
    main()
