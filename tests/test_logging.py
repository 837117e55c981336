"""The CLI sets up the `llava_core` log lines once: INFO and above on stderr, one line each, whichever module logs;
so does every process Ray starts for the run."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _logging_here() -> tuple[list[str], int]:
    logger = logging.getLogger("llava_core")
    return [type(handler).__name__ for handler in logger.handlers], logger.getEffectiveLevel()


class LoggingProbe:
    def logging_here(self) -> tuple[list[str], int]:
        return _logging_here()


@pytest.mark.integration
def test_ray_workers_show_the_projects_info_lines(ray_session):
    # Ray Data, Train and Serve run their code in worker processes: without the setup hook their log.info is lost.
    task = ray_session.remote(num_cpus=0)(_logging_here)
    actor = ray_session.remote(num_cpus=0)(LoggingProbe)
    assert ray_session.get(task.remote()) == (["StderrHandler"], logging.INFO)
    assert ray_session.get(actor.remote().logging_here.remote()) == (["StderrHandler"], logging.INFO)
