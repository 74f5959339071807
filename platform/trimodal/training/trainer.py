"""Driver side: build the `TorchTrainer` for a stage, run it, export `final/`.

Run directory layout (`--out DIR`):
  DIR/train/            Ray Train storage: checkpoint_* directories and the checkpoint manager snapshot
  DIR/metrics.jsonl     one line per step; DIR/loss.png the loss curve; DIR/samples.jsonl sample predictions
  DIR/attempts.jsonl    one line per worker-group start: the step it started at (a restart resumes > 0), pid
  DIR/workers.jsonl     one line per worker that finished: rank, steps run, digests of its data and final weights
  DIR/final/            projector.safetensors, adapter/, config.yaml, run.json (what evaluation and serving load)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from trimodal.config import StageConfig, TrimodalConfig
from trimodal.files import publish_dir
from trimodal.training.loop import LoopOptions, train_loop
from trimodal.training.samples import sample_prompts
from trimodal.training.scaffold import check_resume, run_config, scaling_config, torch_config


def stage_config(cfg: TrimodalConfig, stage: int) -> StageConfig:
    """The StageConfig of stage 0, 1 or 2."""
    return getattr(cfg, f"stage{stage}")


def with_stage_overrides(cfg: TrimodalConfig, stage: int, **values) -> TrimodalConfig:
    """A copy of `cfg` with the given StageConfig fields replaced (None values are ignored); validated."""
    changes = {k: v for k, v in values.items() if v is not None}
    new_stage = dataclasses.replace(stage_config(cfg, stage), **changes)
    return dataclasses.replace(cfg, **{f"stage{stage}": new_stage}).validate()


def _samples(dataset, cfg: TrimodalConfig, n: int = 3) -> list[dict]:
    """The first `n` rows of `dataset` as sample prompts for `print_samples`."""
    rows = dataset.limit(n).take_all() if dataset is not None else []
    for row in rows:
        row["embedding"] = np.asarray(row["embedding"], dtype=np.float32)
    return sample_prompts(rows, cfg.data.caption_prompt)


def run_stage(cfg: TrimodalConfig, stage: int, data_dir: Path, out_dir: Path, resume: bool = False,
              init_run: Path | None = None, quantize: bool = True, fail_at_step: int = 0) -> Path:
    """Train stage 1 or 2 with Ray Train on the preprocessed data; return the exported `final/` directory."""
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    from trimodal.data.readers import embedding_shape, open_stage1, open_stage2, read_manifest

    check_resume(out_dir, resume)
    manifest = read_manifest(data_dir)
    opener = open_stage1 if stage == 1 else open_stage2
    train_ds = opener(data_dir, "train")
    val_ds = opener(data_dir, "val")
    num_patches, vision_dim = embedding_shape(manifest)
    options = LoopOptions(stage=stage, run_dir=str(out_dir.resolve()), vision_dim=vision_dim,
                       num_patches=num_patches, init_run=str(init_run) if init_run else None,
                       quantize=quantize, fail_at_step=fail_at_step)
    stage_cfg = stage_config(cfg, stage)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same batches on a resumed run
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "options": asdict(options), "samples": _samples(val_ds, cfg)},
        scaling_config=scaling_config(stage_cfg), run_config=run_config(out_dir, stage_cfg),
        torch_config=torch_config(stage_cfg),
        datasets={"train": train_ds}, dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest))
    started = time.perf_counter()
    result = trainer.fit()
    meta = {"stage": stage, "steps": stage_cfg.steps, "data": str(data_dir.resolve()),
            "vision_tower": manifest["inputs"].get("vision_dir"), "vision_model_id": manifest["encoder"]["model_id"],
            "vision_untrained": manifest["encoder"]["untrained"], "init_run": options.init_run,
            "quantized": stage == 2 and quantize and cfg.quant.load_in_4bit,
            "final_loss": result.metrics.get("loss"), "train_seconds": round(time.perf_counter() - started, 1),
            "preset": cfg.name}
    return export_from_checkpoint(result.checkpoint.path, out_dir / "final", meta)


def export_from_checkpoint(checkpoint_dir: str, final_dir: Path, meta: dict) -> Path:
    """Copy projector, adapter and config of the last checkpoint into `final/` with run.json, replacing `final/`
    in one rename (`trimodal.files.publish_dir`)."""
    src = Path(checkpoint_dir)
    with publish_dir(final_dir) as scratch:
        shutil.copy2(src / "projector.safetensors", scratch / "projector.safetensors")
        shutil.copy2(src / "config.yaml", scratch / "config.yaml")
        if (src / "adapter").is_dir():
            shutil.copytree(src / "adapter", scratch / "adapter")
        (scratch / "run.json").write_text(json.dumps(meta, indent=2))
    return final_dir
