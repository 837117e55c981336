"""Where the `llava_core` log lines go: INFO and above on stderr, in the CLI's process and in every Ray worker,
Train rank and Serve replica the run starts (Ray forwards their stderr to the driver, prefixed by the process)."""
from __future__ import annotations

import logging
import sys

# Every process Ray starts for the run calls this first (Ray's `worker_process_setup_hook`). Without it the workers'
# `llava_core` loggers have no handler: Python shows their warnings bare and drops every INFO line.
RUNTIME_ENV = {"worker_process_setup_hook": "llava_core.logs.configure_logging"}


class StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each record (pytest, Ray and Serve replace it), not as it was at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def configure_logging() -> None:
    """The `llava_core` loggers' INFO lines on stderr, set up once per process (a second call adds nothing)."""
    logger = logging.getLogger("llava_core")
    if any(isinstance(handler, StderrHandler) for handler in logger.handlers):
        return
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def init_ray(address: str | None = None, **kwargs) -> None:
    """`ray.init` for this project: its own logging, set up in every process of the run, not Ray's."""
    import ray

    ray.init(address=address, configure_logging=False, runtime_env=RUNTIME_ENV, **kwargs)
