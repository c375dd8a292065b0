"""The documentation holds together: every relative link and anchor in the README, docs/,
the protocol docs and deploy/ resolves; the README stays short; the configuration reference
and its JSON schema are generated from the models, and say what every field is for."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from sidecar.config import parse_config
from sidecar.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "CHANGELOG.md", ROOT / "deploy" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
    + list((ROOT / "proto" / "fse" / "v1").glob("*.md"))
)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\w)|(?<=\w)_", lambda m: "_" if m.group(0) == "_" else "", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    out |= set(re.findall(r'<a (?:name|id)="([^"]+)"', text))
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text()))


def test_the_link_finder_finds_links_and_anchors() -> None:
    """The checks below mean something only if these find what is there."""
    readme = links(ROOT / "README.md")
    assert any(t.startswith("docs/") for t in readme)
    assert slug("Stream-level guarding: the gate, the `loop` guard") == "stream-level-guarding-the-gate-the-loop-guard"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc: Path) -> None:
    dead = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not fetched here (no network in CI)
            continue
        where, _, anchor = target.partition("#")
        dest = (doc.parent / where).resolve() if where else doc
        if not dest.exists():
            dead.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not dead, f"{doc.relative_to(ROOT)}: " + "; ".join(dead)


def test_the_readme_is_short_and_points_at_every_doc() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    readme_links = set(links(ROOT / "README.md"))
    for doc in (ROOT / "docs").glob("*.md"):
        assert any(t.split("#")[0] == f"docs/{doc.name}" for t in readme_links), f"the README does not link docs/{doc.name}"


def _schema() -> dict:
    return json.loads((ROOT / "docs" / "fse-sidecar.schema.json").read_text())


def test_the_configuration_reference_and_schema_are_what_the_models_generate() -> None:
    r = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_configuration_field_says_what_it_is_for() -> None:
    schema = _schema()
    for name, model in [("SidecarConfig", schema), *schema["$defs"].items()]:
        assert model.get("description"), f"{name} has no docstring"
        for field, prop in model["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no comment in sidecar/config.py"


def test_the_schema_accepts_the_shipped_and_documented_files_and_refuses_what_the_sidecar_refuses() -> None:
    validator = Draft202012Validator(_schema())
    shipped = yaml.safe_load((ROOT / "deploy" / "kustomize" / "base" / "sidecar.yaml").read_text())
    text = (ROOT / "docs" / "configuration.md").read_text()
    documented = yaml.safe_load(re.search(r"```yaml\n(listen:.*?)```", text, re.S).group(1))
    for data in (shipped, documented):
        assert not list(validator.iter_errors(data))
        parse_config(data)  # the sidecar agrees
    typo = {**documented, "policies": {"default": {"guards": {"neg_logrob": {"enabled": True, "threshold": 9}}}}}
    assert list(validator.iter_errors(typo))
    with pytest.raises(ConfigError, match="neg_logrob"):
        parse_config(typo)


# Every measured figure in the docs must come from a kept run: a generated block (a bench
# table, the reliability section, the configuration reference); parameters written in prose
# (a default, a threshold) are in code spans.
MEASURED = ("README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))))
FIGURE = re.compile(r"(?<![\w.])(?:\d+\.\d+|\d+)\s*(?:µs|ms|tok/s|tokens/s|%|x(?![\w-]))|(?<![\w.=-])\d+\.\d+(?![\w.])")
GENERATED = re.compile(r"<!-- (bench:\w+|reliability|config-reference)\b.*?<!-- /\1 -->", re.S)


def prose(text: str) -> str:
    """``text`` without its generated bench blocks, fenced code and inline code."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", GENERATED.sub("", text)))


def test_the_figure_finder_finds_measured_figures() -> None:
    found = FIGURE.findall(prose("the fast lane ran at 0.93 of unguarded, 24 µs a step and 2.9x faster; `0.5 ms` in code"))
    assert found == ["0.93", "24 µs", "2.9x"]
    assert not FIGURE.findall(prose("<!-- bench:x -->\n0.93, 24 µs\n<!-- /bench:x -->\nlayout version 2, 49k ids"))


@pytest.mark.parametrize("name", MEASURED)
def test_every_measured_figure_in_the_docs_comes_from_a_kept_benchmark_run(name: str) -> None:
    figures = FIGURE.findall(prose((ROOT / name).read_text()))
    assert not figures, f"{name}: figures outside a generated bench block (scripts/gen_bench_docs.py): {figures}"


def test_the_benchmark_tables_are_the_ones_their_runs_print() -> None:
    r = subprocess.run([sys.executable, "scripts/gen_bench_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
    for doc in [ROOT / n for n in MEASURED] + list((ROOT / "docs").glob("*.md")):
        for suite in re.findall(r"<!-- bench:(\w+) -->", doc.read_text()):
            assert (ROOT / "docs" / "bench" / f"{suite}.json").exists(), f"{doc.name}: bench:{suite} has no run kept"
