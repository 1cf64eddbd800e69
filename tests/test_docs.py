"""The README and docs/ as a newcomer reads them in a clone: every link resolves, the
quick-start output matches a fresh run, and nothing points outside the repository."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CHANGELOG.md")] + sorted(
    os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*]", "", heading.strip().lower())
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def _links(path: str):
    with open(path) as f:
        for target in LINK.findall(_prose(f.read())):
            if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto: are not checked offline
                yield target


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, ROOT) for d in DOCS])
def test_every_relative_link_resolves(doc):
    assert os.path.isfile(doc), f"{doc} is missing"
    broken = []
    for target in _links(doc):
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
        if not dest.startswith(ROOT + os.sep):
            broken.append(f"{target}: points outside the repository (dead in a clone)")
        elif not os.path.exists(dest):
            broken.append(f"{target}: no such file")
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not broken, "\n".join(broken)


def test_the_link_check_catches_what_it_should(tmp_path):
    """The checker itself: a missing file, a missing anchor and a path outside the clone fail."""
    good = tmp_path / "a.md"
    good.write_text("# Step atomicity\n[x](a.md#step-atomicity) `[not](a link)`\n")
    assert list(_links(str(good))) == ["a.md#step-atomicity"]
    assert "step-atomicity" in _anchors(str(good))
    assert _slug("5. Contracts every integration keeps") == "5-contracts-every-integration-keeps"
    assert _slug("An element with `G_i == 0` is never sent") == "an-element-with-g_i--0-is-never-sent"


def test_readme_names_no_file_outside_the_repository():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert "../shared" not in text and "ADACOMP.md" not in text


def test_readme_order_is_a_user_guide():
    """What it is, install, quick start, use, launching, tests come first; evidence after."""
    with open(os.path.join(ROOT, "README.md")) as f:
        heads = [h for h in re.findall(r"^## (.*)$", _prose(f.read()), flags=re.M)]
    want = ["Install", "Quick start", "Use", "Launching", "Tests", "Results"]
    assert [h for h in heads if h in want] == want, heads


def test_readme_quickstart_output_matches_a_fresh_run():
    """The block under "Quick start" is what `make train` prints now (docs/quickstart.py)."""
    pytest.importorskip("sklearn", reason="the main job's digits need scikit-learn: pip install scikit-learn")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "quickstart.py"), "--check",
                           os.path.join(ROOT, "README.md")], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_quickstart_check_sees_a_stale_readme(tmp_path):
    """docs/quickstart.py flags a README whose figures are off, and allows CPU-level noise."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "README.md")) as f:
        block = quickstart.readme_block(f.read())
    assert quickstart.differences(block, block) == []
    rows = quickstart._rows(block)
    assert set(rows) == {"none", "adacomp/allgather"}, rows
    acc = rows["none"][0]
    worse = f"{float(acc.rstrip('%')) - 2:.2f}%"
    assert quickstart.differences(block, block.replace(acc, worse, 1))
    close = f"{float(acc.rstrip('%')) - 0.3:.2f}%"
    assert quickstart.differences(block, block.replace(acc, close, 1)) == []
    assert quickstart.differences(block, block.replace("adacomp/allgather", "adacomp/sharded"))
