"""The evaluate stage's answer collection: answers by key, one progress line (the backends' comparison on a real model:
tests/end_to_end/test_eval_backends.py)."""
from __future__ import annotations

import logging


def test_answers_are_collected_by_key_with_a_progress_line_at_the_end(caplog):
    from llava_core.eval.backends import collect_answers

    caplog.set_level(logging.INFO, logger="llava_core")
    answers = collect_answers(iter([("1", "cat"), ("0", "dog"), ("2", "two")]), total=3)
    assert answers == {"0": "dog", "1": "cat", "2": "two"}
    lines = [r.getMessage() for r in caplog.records if r.name == "llava_core.eval.backends"]
    assert len(lines) == 1 and lines[0].startswith("[evaluate] prompt 3/3 (100%) "), lines
