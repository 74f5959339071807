"""Evaluate a finished run on the held-out split: caption BLEU-4 / CIDEr-D and accuracy per question type.

    python jobs/evaluate.py --run runs/demo/finetune --data runs/demo/data

Writes RUN/eval.json and RUN/predictions.jsonl (one line per caption and per question) and prints a table.
"""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a training run directory (with final/)")
    parser.add_argument("--data", required=True, type=Path, help="the jobs/preprocess.py output directory")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=None, help="only the first N held-out images")
    parser.add_argument("--batch-size", type=int, default=16, help="questions decoded together")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from trimodal.data.readers import DataDirError
    from trimodal.evaluation.run_eval import evaluate_run, print_table

    try:
        result = evaluate_run(args.run, args.data, args.split, args.limit, args.batch_size, args.device)
    except (DataDirError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    print(f"[evaluate] wrote {args.run / 'eval.json'} and {args.run / 'predictions.jsonl'} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
