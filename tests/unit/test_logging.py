"""The CLI sets up the `llava_core` log lines once: INFO and above on stderr, one line each, whichever module logs,
and the libraries' noise filtered (every process Ray starts for the run does the same:
tests/integration/test_logging.py)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_the_cli_shows_info_lines_once_and_keeps_stdout_clean():
    code = ("import logging; from llava_core.logs import configure_logging; configure_logging(); configure_logging(); "
            "logging.getLogger('llava_core.data.pipeline').info('prepare %s: %d rows', 'align', 64); "
            "logging.getLogger('llava_core.train').debug('not shown')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith(" INFO llava_core.data.pipeline: prepare align: 64 rows"), lines


def test_main_configures_logging():
    code = ("import logging, sys; from llava_core.cli import main; main(['schema']); "
            "print(logging.getLogger('llava_core').getEffectiveLevel(), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stderr.split() == [str(logging.INFO)]


# The noise of a run, made on purpose after the CLI has set up logging: torch's deprecation of the collective
# DeepSpeed calls each step (with the once-per-place memory reset between, as libraries' catch_warnings do),
# transformers' torchvision fallback, Ray Serve's lost end-of-stream future; and a deprecation in our own code.
NOISE = """
import asyncio, gc, sys, warnings
from llava_core.cli import main
main(sys.argv[1:])
import torch, torch.distributed as dist
for _ in range(3):
    with warnings.catch_warnings():
        pass
    try:
        dist.all_gather_into_tensor(torch.zeros(2), torch.zeros(1))
    except Exception:
        pass
import transformers
transformers.LlavaImageProcessor
async def lost_end_of_stream():
    future = asyncio.get_running_loop().create_future()
    future.set_exception(StopAsyncIteration())
    del future
    gc.collect()
asyncio.run(lost_end_of_stream())
warnings.warn_explicit("our own deprecated call", FutureWarning, "llava_core/x.py", 1, module="llava_core.x")
"""


def _stderr_of_cli(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("LLAVA_RAY_VERBOSE", None)
    out = subprocess.run([sys.executable, "-c", NOISE, *args], cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=300)
    return out.stderr


def test_library_noise_is_filtered_by_default_and_shown_with_verbose():
    quiet = _stderr_of_cli("schema")
    assert quiet.splitlines() == ["llava_core/x.py:1: FutureWarning: our own deprecated call"], quiet
    loud = _stderr_of_cli("serve", "--verbose", "/nowhere")  # the flag is read before the missing export fails
    assert loud.count("`torch.distributed.all_gather_into_tensor` is deprecated") == 3
    assert loud.count("`LlavaImageProcessor` requires torchvision (not installed)") == 1
    assert "Future exception was never retrieved\nfuture: <Future finished exception=StopAsyncIteration()>" in loud
    assert loud.count("our own deprecated call") == 1
