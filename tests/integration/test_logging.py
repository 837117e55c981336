"""Every process Ray starts for a run sets up the `llava_core` log lines as the CLI does (tests/unit/test_logging.py):
INFO and above on stderr, the libraries' deprecations filtered, ours shown."""
from __future__ import annotations

import logging
import warnings


def _logging_here() -> tuple[list[str], int, list[str]]:
    logger = logging.getLogger("llava_core")
    with warnings.catch_warnings(record=True) as shown:  # the process's filters as they are, warnings recorded
        warnings.warn_explicit("a library's deprecation", FutureWarning, "c10d_logger.py", 83,
                               module="torch.distributed.c10d_logger")
        warnings.warn_explicit("our deprecation", FutureWarning, "loop.py", 1, module="llava_core.train.loop")
    return [type(handler).__name__ for handler in logger.handlers], logger.getEffectiveLevel(), [
        str(w.message) for w in shown]


class LoggingProbe:
    def logging_here(self) -> tuple[list[str], int, list[str]]:
        return _logging_here()


def test_ray_workers_show_the_projects_info_lines_and_filter_the_libraries_noise(ray_session):
    # Ray Data, Train and Serve run their code in worker processes: without the setup hook their log.info is lost.
    task = ray_session.remote(num_cpus=0)(_logging_here)
    actor = ray_session.remote(num_cpus=0)(LoggingProbe)
    # ... and the libraries' deprecations are filtered there too, ours not
    expected = (["StderrHandler"], logging.INFO, ["our deprecation"])
    assert ray_session.get(task.remote()) == expected
    assert ray_session.get(actor.remote().logging_here.remote()) == expected
