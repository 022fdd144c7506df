"""An opt-in trace of rank 0's engine loop, one JSON line per step, for finding where a stream's gap
between two tokens went (benchmarks/bench_served.py summarizes it): set DSQV_STEP_TRACE to a file path.

Each line: `t` (perf_counter seconds at the start of planning), `plan_s` (planning), `launch_s` (broadcast,
enqueueing the step's kernels, the picks), `wait_s` (waiting for the previous step's tokens on the host),
`consume_s` (their detokenization and events), the step's `prefill` chunks as [slot, start, end] (start 0:
a new sequence) and `decode` (rows). Off (None) unless asked for: the loop pays nothing then.
"""
from __future__ import annotations

import json
import os


class StepTrace:
    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)  # line-buffered: a killed server leaves whole lines

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get("DSQV_STEP_TRACE")
        return cls(path) if path else None

    def step(self, **fields) -> None:
        self.file.write(json.dumps(fields) + "\n")

    def close(self) -> None:
        self.file.close()
