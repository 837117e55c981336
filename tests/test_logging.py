"""The CLI sets up the `llava_core` log lines once: INFO and above on stderr, one line each, whichever module logs."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_cli_shows_info_lines_once_and_keeps_stdout_clean():
    code = ("import logging; from llava_core.cli import configure_logging; configure_logging(); configure_logging(); "
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
