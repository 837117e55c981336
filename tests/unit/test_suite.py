"""The suite's own rules: the code base is clean under pyproject's ruff settings (`make lint` runs the same check),
and every test is in exactly one tier, the folder it is in (tests/conftest.py)."""
import os
import subprocess
import sys

from tests.conftest import TIERS, tier_of

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_ruff_check_is_clean():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", ROOT],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "No module named ruff" not in run.stderr, "ruff is missing: pip install -e '.[dev]'"
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_selected_test_is_in_exactly_one_tier(request):
    for item in request.session.items:
        tiers = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
        assert tiers == [tier_of(item.path)], f"{item.nodeid}: {tiers}"
