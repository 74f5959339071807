"""Data: readers for COCO captions and LLaVA-Instruct (`formats`), the synthetic "shapes" set (`shapes`),
and the Ray Data pipelines that turn them into Parquet."""
