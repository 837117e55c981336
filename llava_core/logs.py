"""Where the `llava_core` log lines go: INFO and above on stderr, in the CLI's process and in every Ray worker,
Train rank and Serve replica the run starts (Ray forwards their stderr to the driver, prefixed by the process).

The default log is quiet: what libraries say about each other (deprecations one library raises about another's
calls, once per step; transformers' torchvision fallback, once per processor class per process; Ray Serve's
unretrieved end-of-stream futures, once per request) is filtered here, in every process, and Ray Data's periodic
progress blocks give way to the stages' own progress lines. `llava-ray ... --verbose` (the LLAVA_RAY_VERBOSE
variable, which reaches every process of the run) shows all of it."""
from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "LLAVA_RAY_VERBOSE"

# Every process Ray starts for the run calls this first (Ray's `worker_process_setup_hook`). Without it the workers'
# `llava_core` loggers have no handler: Python shows their warnings bare and drops every INFO line.
RUNTIME_ENV = {"worker_process_setup_hook": "llava_core.logs.configure_logging"}

# Deprecations raised where our own code calls a deprecated API stay visible: those are ours to fix. The same
# warnings raised inside a library (torch's `all_gather_into_tensor is deprecated`, raised for DeepSpeed's ZeRO
# collectives on every step of every rank) are that library's to fix, and would bury the progress lines.
OWN_MODULES = r"(llava_core|jobs|benchmarks|tests)(\.|$)"
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each record (pytest, Ray and Serve replace it), not as it was at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure_logging() -> None:
    """The `llava_core` loggers' INFO lines on stderr, and the libraries' noise filtered unless verbose; set up once
    per process (a second call adds nothing)."""
    logger = logging.getLogger("llava_core")
    if any(isinstance(handler, StderrHandler) for handler in logger.handlers):
        return
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if not verbose():
        quiet_libraries()


class DropMessages(logging.Filter):
    """Drops a library logger's records whose message contains any of `parts`."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


def quiet_libraries() -> None:
    for category in DEPRECATIONS:  # inserted at the front: the later line wins for our own modules
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=OWN_MODULES)
    # Logged once per `<Model>ImageProcessor` class per process: three lines for every worker on a CPU install.
    logging.getLogger("transformers.utils.import_utils").addFilter(DropMessages(TORCHVISION_FALLBACK))
    # Ray Serve ends a streamed answer by setting StopAsyncIteration on its future, which nothing awaits; asyncio's
    # garbage-collection check then logs it with a traceback, once per request in the replica's log.
    logging.getLogger("asyncio").addFilter(DropMessages("exception=StopAsyncIteration()"))


def quiet_ray_data() -> None:
    """On the driver: no Ray Data progress blocks (eight lines every 10 s per dataset when stdout is not a terminal);
    prepare and evaluate log their own progress line (`llava_core.progress`)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    # ... and not its one-time notice that they are off.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def init_ray(address: str | None = None, **kwargs) -> None:
    """`ray.init` for this project: its own logging, set up in every process of the run, not Ray's; verbose in
    every process when the driver is."""
    import ray

    runtime_env = {**RUNTIME_ENV, "env_vars": {VERBOSE_ENV: "1"}} if verbose() else RUNTIME_ENV
    ray.init(address=address, configure_logging=False, runtime_env=runtime_env, **kwargs)
    if not verbose():
        quiet_ray_data()
