"""Does a tower's patch features say where a shape is? A linear probe on a preprocessed shapes run.

    python bench/position_probe.py --data runs/demo/data --shapes runs/demo/shapes

For every shape it takes the mean of the patch features inside it (patches whose centre lies within 0.8 of the
shape's radius), fits ridge regression from that feature to the shape's centre x on the training images and scores
it on the held-out ones. R^2 near 0 means the features do not carry x, so left/right cannot be read from them.
Prints R^2 and the mean error in pixels, and the same for each patch's column.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np


def object_rows(features: np.ndarray, objects: list[dict], grid: int, image_size: int) -> list[tuple]:
    """(mean feature of the patches inside the object, centre x) per object of one image."""
    cell = image_size / grid
    rows = []
    for o in objects:
        (cx, cy), radius = o["center"], o["radius"]
        inside = [k for k in range(grid * grid)
                  if ((k % grid + 0.5) * cell - cx) ** 2 + ((k // grid + 0.5) * cell - cy) ** 2 <= (0.8 * radius) ** 2]
        if inside:
            rows.append((features[inside].mean(0), float(cx)))
    return rows


def ridge_r2(x_train, y_train, x_test, y_test, lam: float = 1.0) -> tuple[float, float]:
    """(R^2, mean absolute error) of ridge regression fitted on train, scored on test."""
    a = np.c_[x_train, np.ones(len(x_train))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y_train)
    pred = np.c_[x_test, np.ones(len(x_test))] @ w
    return 1 - float(((pred - y_test) ** 2).mean() / y_test.var()), float(np.abs(pred - y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the jobs/preprocess.py output directory")
    parser.add_argument("--shapes", type=Path, required=True, help="the shapes set (its shapes_meta.json)")
    args = parser.parse_args()
    import pyarrow.parquet as pq

    encoder = json.loads((args.data / "manifest.json").read_text())["encoder"]
    grid = math.isqrt(encoder["num_patches"])  # 49 patches: a 7x7 grid
    table = pq.read_table(next((args.data / "images").glob("*.parquet"))).to_pydict()
    images = {m["image_id"]: m for m in json.loads((args.shapes / "shapes_meta.json").read_text())["images"]}
    objects: dict[str, list] = {"train": [], "val": []}
    patches: dict[str, list] = {"train": [], "val": []}
    for image_id, flat, split in zip(table["image_id"], table["embedding"], table["split"], strict=True):
        features = np.asarray(flat, dtype=np.float32).reshape(grid * grid, -1)  # [49 * D] -> [49, D]
        objects[split] += object_rows(features, images[image_id]["objects"], grid, images[image_id]["width"])
        patches[split].append(features)
    x = {s: np.stack([r[0] for r in objects[s]]) for s in objects}
    y = {s: np.array([r[1] for r in objects[s]], dtype=np.float32) for s in objects}
    r2, mae = ridge_r2(x["train"], y["train"], x["val"], y["val"])
    print(f"object centre x from its patches: R^2 {r2:.3f}, mean error {mae:.1f} px ({len(y['val'])} held-out shapes)")
    train, val = np.stack(patches["train"]), np.stack(patches["val"])  # [n, 49, D]
    columns = np.arange(grid * grid, dtype=np.float32) % grid
    r2, mae = ridge_r2(train.reshape(-1, train.shape[-1]), np.tile(columns, len(train)),
                       val.reshape(-1, val.shape[-1]), np.tile(columns, len(val)))
    print(f"patch column from its feature: R^2 {r2:.3f}, mean error {mae:.2f} columns")


if __name__ == "__main__":
    main()
