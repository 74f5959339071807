"""Re-score an evaluation with the lenient rule (contains the expected word) and the strict one, side by side.

    python scripts/rescore.py runs/demo/finetune/predictions.jsonl [--json]

Reads the question rows that `jobs/evaluate.py` wrote (kind "question": type, question, first_turn, predicted,
reference) and prints, per question type, all turns and first turns: each rule's accuracy and correct/total.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trimodal.evaluation.scoring import format_rescore, rescore_predictions


def main(argv: list[str] | None = None) -> int:
    """Print the lenient-vs-strict table of one predictions.jsonl; 1 when the file cannot be read."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="a run's predictions.jsonl")
    parser.add_argument("--json", action="store_true", help="print the table as JSON instead")
    args = parser.parse_args(argv)
    try:
        table = rescore_predictions(args.predictions)
    except (OSError, ValueError, KeyError) as exc:
        print(f"rescore: cannot read {args.predictions}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(table, indent=1) if args.json else format_rescore(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
