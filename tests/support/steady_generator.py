"""Test support that runs inside a Serve replica: the LanguageModel swaps its decoder for a `SteadyGenerator` when
it is built with `test_token_delay_s` > 0 (serve_app.settings; the test ingress of tests/integration/test_serve_app.py
and scripts/drills/serve_replica_kill.py ask for it). The replica imports this module by its name, so it lives in
a package the replica can import: the repository root is on the driver's sys.path, and Ray workers inherit it."""

from __future__ import annotations

import time
from typing import Iterator, Sequence

from trimodal.inference.engine import Delta, Prompt, TextGenerator
from trimodal.inference.requests import SamplingParams


class SteadyGenerator:
    """A stand-in for TextGenerator, for tests and drills: the real tokenizer and prompt limit, then "x" for every
    token up to max_tokens, one decoding step every `delay_s` seconds whatever the model would say; a cancelled row
    stops at the next step. Its answers take at least max_tokens * delay_s seconds, on any machine."""

    def __init__(self, real: TextGenerator, delay_s: float):
        self.encode = real.encode
        self.delay_s = delay_s

    def stream(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams], cancelled: set[int],
               adapters: Sequence[str] | None = None) -> Iterator[Delta]:
        limits, counts = [p.max_tokens for p in params], [0] * len(prompts)
        for step in range(1, max(limits) + 1):
            live = [row for row in range(len(prompts)) if row not in cancelled and step <= limits[row]]
            if not live:
                break
            time.sleep(self.delay_s)
            for row in live:
                counts[row] = step
                yield Delta(row, "x", "length" if step == limits[row] else None, step)
        for row in range(len(prompts)):
            if counts[row] < limits[row]:
                yield Delta(row, "", "cancelled", counts[row])
