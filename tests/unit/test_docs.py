"""The docs: the site builds with `mkdocs build --strict` and the README stays a five-minute read whose links into
docs/ resolve. The README's commands run as written in tests/integration/test_docs.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.docs_helpers import ROOT, readme, validate_lines

README_MAX_LINES = 200


# --- the site -----------------------------------------------------------------------------------------------------


def mkdocs_build(root: str, site_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site_dir],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_strictly(tmp_path):
    built = mkdocs_build(ROOT, str(tmp_path / "site"))
    assert built.returncode == 0 and "WARNING" not in built.stderr, built.stderr
    for page in ("index.html", "reference/workflow/index.html", "results/index.html", "troubleshooting/index.html"):
        assert (tmp_path / "site" / page).is_file()


@pytest.mark.parametrize("spoil, named", [
    (lambda docs: (docs / "index.md").open("a").write("\n[gone](no-such-page.md)\n"), "no-such-page.md"),
    (lambda docs: (docs / "index.md").open("a").write("\n[gone](data.md#no-such-section)\n"), "no-such-section"),
    (lambda docs: (docs / "orphan.md").write_text("# Not in the nav\n"), "orphan.md"),
], ids=["broken link", "broken anchor", "page not in the nav"])
def test_the_strict_build_fails_on_a_warning(tmp_path, spoil, named):
    copy = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "docs"), copy / "docs")
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), copy / "mkdocs.yml")
    spoil(copy / "docs")
    built = mkdocs_build(str(copy), str(tmp_path / "site"))
    assert built.returncode != 0 and named in built.stderr, built.stderr


# --- the README ---------------------------------------------------------------------------------------------------


def test_the_readme_is_a_five_minute_read():
    assert len(readme().splitlines()) <= README_MAX_LINES


def test_every_readme_link_into_docs_resolves():
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        nav = json.dumps(yaml.safe_load(f)["nav"])
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", readme())
    assert len(set(links)) >= 10  # the tour's five answers and the site's pages
    for link in links:
        assert os.path.isfile(os.path.join(ROOT, link)), link
        assert json.dumps(link.removeprefix("docs/")) in nav, f"{link} is not in mkdocs.yml's nav"


def test_the_files_the_readme_names_exist():
    named = set(re.findall(r"\b((?:cluster|workflows|jobs|benchmarks|llava_core)/[\w./-]*\w)", readme()))
    assert {"cluster/rayjob.yaml", "workflows/llava-v1.5-7b.yaml", "jobs/run_workflow.py"} <= named
    assert [path for path in sorted(named) if not os.path.exists(os.path.join(ROOT, path))] == []


def test_the_readme_shows_validate():
    assert len(validate_lines()) >= 3
