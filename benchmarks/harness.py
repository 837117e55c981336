"""What every benchmark shares: the `--smoke` flag and the summary line.

`--smoke` runs a benchmark's own code path at tiny sizes in seconds (tests/integration/test_benchmarks.py and
tests/end_to_end/test_benchmarks.py run each one so); its figures check that the script works, they measure nothing.
Options given on the command line still win over the smoke sizes.

The summary is one JSON object on the last line of stdout, nothing after it. Native libraries write to the process's
stdout behind Python's back, out of order with Python's buffered output (the tokenizers library prints `Ignored
unknown kwarg option __type` for the `__type` keys of Vicuna's tokenizer_config.json), so `parse_args` points file
descriptor 1 at stderr for the whole run and `print_summary` alone writes to the real stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_summary_fd: int | None = None


def parse_args(parser: argparse.ArgumentParser, smoke: dict, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser`'s arguments, with `smoke`'s values as the defaults under `--smoke`; every other line of output goes
    to stderr from here on."""
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the script, measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    _stdout_to_stderr()
    return args


def _stdout_to_stderr() -> None:
    global _summary_fd
    if _summary_fd is None:
        sys.stdout.flush()
        _summary_fd = os.dup(1)
        os.dup2(2, 1)


def print_summary(summary: dict) -> None:
    """The benchmark's result: one JSON line on the real stdout (the last one, when called last)."""
    sys.stdout.flush()
    with os.fdopen(1 if _summary_fd is None else _summary_fd, "w", closefd=False) as stdout:
        stdout.write(json.dumps(summary) + "\n")
