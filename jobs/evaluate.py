"""Evaluate a finished run on the held-out split: caption BLEU-4 / CIDEr-D and accuracy per question type.

    python jobs/evaluate.py --run runs/demo/finetune --data runs/demo/data
    ray job submit ... -- python jobs/evaluate.py --run RUN --data DATA --gpus 1 --accelerator-type A100-40G

With --gpus the evaluation runs as a Ray task on a node with that many GPUs (on a cluster: the GPU worker, which the
request starts), not in the job's driver on the head; RUN and DATA must be on storage every node sees.
Writes RUN/eval.json and RUN/predictions.jsonl (one line per caption and per question) and prints a table.
"""

import _project  # noqa: F401  (first: this job's own library, or one line saying why it cannot run)
import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a training run directory (with final/)")
    parser.add_argument("--data", required=True, type=Path, help="the jobs/preprocess.py output directory")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out images")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="prompts decoded together (about: an image's prompts are never split; less saves memory)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda where torch sees a GPU)")
    parser.add_argument("--gpus", type=float, default=0,
                        help="run the evaluation as a Ray task holding this many GPUs (0: in this process)")
    parser.add_argument("--accelerator-type", default=None, help="with --gpus: the GPU type to ask Ray for")
    args = parser.parse_args()
    from trimodal.cli import on_gpu_node, require_data_dir, require_run, run_job
    from trimodal.evaluation.run_eval import print_table

    def evaluate() -> dict:
        from trimodal.evaluation.run_eval import evaluate_run
        from trimodal.hardware import pick_device

        device = pick_device(args.device)
        print(f"[evaluate] on {device}", flush=True)
        return evaluate_run(args.run, args.data, args.split, args.limit, args.batch_size, device)

    def job() -> None:
        require_run(args.run, "--run")
        require_data_dir(args.data)
        result = on_gpu_node(evaluate, args.gpus, args.accelerator_type) if args.gpus > 0 else evaluate()
        print_table(result)
        print(f"[evaluate] wrote {args.run / 'eval.json'} and {args.run / 'predictions.jsonl'} in "
              f"{result['seconds']} s")

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
