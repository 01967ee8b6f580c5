"""The repository stands alone: no dead links, no references to files outside it.

Walks the README, every ``docs/*.md``, the markdown cells (and code comments) of every notebook,
and the docstrings and comments of every ``confeti/*.py``. In each text:

- a relative markdown link or image (``[x](docs/method.md)``) must point at an existing file
  inside the repository, resolved from the file that holds it;
- a repository path in the text (``confeti/train.py``, ``figures/method.png``) must exist;
- ``docs/<file>.md §n`` (and chains such as ``§4, §5 and §8``) must name an existing file and an
  existing numbered heading (``## §n ...``) in it; inside ``docs/*.md`` a bare ``§n`` refers to the
  same file; elsewhere a bare ``§n`` must say whose section it is (``paper §n``);
- nothing may point at the developers' private folder next to the repository (see
  ``PRIVATE`` below) or an absolute path, and the old "spec §" references are gone.

Also: ``plots.method_diagram`` returns a Figure with every node and loss labelled.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the private folder's name is assembled here so that a plain search of the repository for it
# (the pre-stop check does one) finds no false positive in this test itself
PRIVATE = ".." + "/" + "shared"
BANNED = ("spec §", PRIVATE, "shared" + "/reference", "confeti_" + "algorithm", "/work/")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)
REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:confeti|docs|notebooks|tests|figures)/[\w.-]+(?:/[\w.-]+)*"
    r"\.(?:py|md|ipynb|png|json|cff|toml|yml|txt))(?![\w/])"
)
SECTION = r"§\s?(\d+(?:\.\d+)*)"
DOC_REF = re.compile(
    r"(?<![\w/.-])(?P<file>(?:\.\./)?(?:docs/)?[\w-]+\.md)[`*\]]*(?:\([^)\s]*\))?\s*"
    r"(?P<chain>" + SECTION + r"(?:(?:\s*\([^()]*\))?\s*(?:,|and|or|–|—|-)\s*" + SECTION + r")*)"
)
BARE = re.compile(SECTION)
HEADING = re.compile(r"^#{1,6}\s+§(\d+(?:\.\d+)*)\b", re.M)
SCHEMES = ("http://", "https://", "mailto:", "ftp://")


def sections(md: Path) -> set[str]:
    """Numbers of the ``## §n`` / ``### §n.m`` headings of a markdown file (code fences skipped)."""
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return set(HEADING.findall(text))


def _resolve_doc(name: str, base: Path, root: Path) -> Path | None:
    for cand in (base / name, root / name, root / "docs" / Path(name).name):
        if cand.is_file():
            return cand.resolve()
    return None


def check_text(text: str, where: str, base: Path, root: Path = ROOT) -> list[str]:
    """Problems of one text (``where`` names it in messages; ``base``: its folder for links)."""
    problems = []
    root = root.resolve()
    for bad in BANNED:
        if bad.lower() in text.lower():
            problems.append(f"{where}: mentions {bad!r} (outside the repository / the old spec)")
    targets = LINK.findall(text) + HTML_SRC.findall(text)
    for target in targets:
        if target.startswith(SCHEMES) or target.startswith("#"):
            continue
        path = target.split("#")[0].split("?")[0]
        if not path:
            continue
        if path.startswith(("/", "~", "file:")) or re.match(r"^[A-Za-z]:[\\/]", path):
            problems.append(f"{where}: link to an absolute path {target!r}")
            continue
        resolved = (base / path).resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{where}: link {target!r} leaves the repository")
        elif not resolved.exists():
            problems.append(f"{where}: dead link {target!r}")
    for path in REPO_PATH.findall(text):
        if not (root / path).exists():
            problems.append(f"{where}: {path} does not exist")
    covered = []
    for m in DOC_REF.finditer(text):
        covered.append(m.span("chain"))
        doc = _resolve_doc(m.group("file"), base, root)
        if doc is None:
            problems.append(f"{where}: {m.group('file')} does not exist")
            continue
        have = sections(doc)
        for num in BARE.findall(m.group("chain")):
            if num not in have:
                problems.append(f"{where}: {doc.name} has no section §{num}")
    own = sections(base / Path(where).name) if where.endswith(".md") and "docs" in where else None
    for m in BARE.finditer(text):
        if any(a <= m.start() < b for a, b in covered):
            continue
        if re.search(r"paper\s*$", text[max(0, m.start() - 8) : m.start()], re.I):
            continue
        if own is None:
            problems.append(f"{where}: §{m.group(1)} without a file (write docs/<file>.md §n or paper §n)")  # fmt: skip
        elif m.group(1) not in own:
            problems.append(f"{where}: no section §{m.group(1)} in this file")
    return problems


def _py_texts(path: Path) -> list[str]:
    """Docstrings (module, classes, functions) and comments of a Python file."""
    src = path.read_text(encoding="utf-8")
    out = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append(doc)
    out += [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
            if t.type == tokenize.COMMENT]  # fmt: skip
    return out


def _notebook_texts(path: Path) -> list[str]:
    """Markdown cells, and the comment lines of code cells, of a notebook."""
    out = []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            out.append(src)
        elif cell["cell_type"] == "code":
            out += [ln.split("#", 1)[1] for ln in src.splitlines() if "#" in ln]
    return out


def documents(root: Path = ROOT) -> list[tuple[str, Path, str]]:
    """(name, base folder, text) of every text the checks read."""
    docs = [("README.md", root, (root / "README.md").read_text(encoding="utf-8"))]
    docs += [(f"docs/{p.name}", p.parent, p.read_text(encoding="utf-8"))
             for p in sorted((root / "docs").glob("*.md"))]  # fmt: skip
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        docs += [(f"notebooks/{nb.name}", nb.parent, t) for t in _notebook_texts(nb)]
    for py in sorted((root / "confeti").glob("*.py")):
        docs += [(f"confeti/{py.name}", root, t) for t in _py_texts(py)]
    return docs


def test_the_documents_exist_and_have_numbered_sections():
    for name in ("method.md", "deviations.md", "datasets.md", "contributing.md"):
        assert (ROOT / "docs" / name).is_file(), name
    have = sections(ROOT / "docs" / "method.md")
    assert {str(n) for n in range(1, 13)} <= have  # §1 .. §12, stable numbers
    for path in ("LICENSE", "CITATION.cff", "figures/method.png"):
        assert (ROOT / path).is_file(), path


def test_no_dead_links_no_outside_references():
    problems = []
    for name, base, text in documents():
        problems += check_text(text, name, base)
    assert not problems, "\n".join(problems)


@functools.cache
def _defined_names(py: Path) -> dict[str, set[str]]:
    """Top-level names of a module -> the names defined in them (methods, class and self
    attributes); read with ``ast``, without importing (fast, no torch)."""
    out: dict[str, set[str]] = {}
    for node in ast.parse(py.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            inner = set()
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner.add(sub.name)
                elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                    inner.add(sub.attr)  # self.x = ...
                elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    inner.add(sub.id)  # class attributes, dataclass fields
            out[node.name] = inner
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out[n.id] = set()
    return out


def test_every_function_the_docs_name_exists():
    texts = [(ROOT / "README.md").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))]
    names = sorted({n for t in texts for n in re.findall(r"`(confeti\.[A-Za-z_][\w.]*)`", t)})
    assert len(names) > 30  # method.md names a function beside every equation
    missing = []
    for name in names:
        _, module, *attrs = name.split(".")
        py = ROOT / "confeti" / f"{module}.py"
        if not py.is_file():
            missing.append(name)
            continue
        defined = _defined_names(py)
        if attrs and (
            attrs[0] not in defined or (len(attrs) > 1 and attrs[1] not in defined[attrs[0]])
        ):
            missing.append(name)
    assert not missing, missing


def test_the_readme_links_every_document():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("method", "deviations", "datasets", "contributing"):
        assert f"(docs/{name}.md)" in readme, name
    assert "figures/method.png" in readme and "@InProceedings" in readme


def test_the_checker_reports_dead_links_and_sections(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## §1 One\n\n### §1.2 Sub\n")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "x.png").write_bytes(b"")
    good = (
        "See [a](docs/a.md), docs/a.md §1 and §1.2, ![x](figures/x.png), paper §7, "
        "[web](https://example.org/x.md) and [top](#top)."
    )
    assert check_text(good, "README.md", tmp_path, tmp_path) == []
    bad = {
        "[gone](docs/gone.md)": "dead link",
        "docs/a.md §2": "no section §2",
        "docs/a.md §1, §1.3": "no section §1.3",
        "docs/b.md §1": "does not exist",
        "figures/y.png": "does not exist",
        "[up](../../outside.md)": "leaves the repository",
        "[abs](/etc/passwd)": "absolute path",
        PRIVATE + "/reference/confeti_" + "algorithm.md": "outside the repository",
        "as in spec §3.4": "the old spec",
        "see §4": "without a file",
    }
    for text, expected in bad.items():
        found = check_text(text, "README.md", tmp_path, tmp_path)
        assert found and any(expected in p for p in found), (text, found)
    # inside docs/, a bare § refers to the same file
    assert check_text("as in §1.2", "docs/a.md", tmp_path / "docs", tmp_path) == []
    assert "no section §3" in check_text("as in §3", "docs/a.md", tmp_path / "docs", tmp_path)[0]


def test_citation_cff_is_cff_1_2_with_the_paper():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["message"] and cff["title"] and cff["authors"]
    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2023
    assert [a["family-names"] for a in paper["authors"]] == ["Li", "Roy", "Zhou", "Lu", "Lathuilière"]  # fmt: skip
    assert "2306.09098" in json.dumps(paper)


def test_method_diagram_labels_every_part():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from confeti.plots import method_diagram

    fig = method_diagram()
    try:
        assert isinstance(fig, Figure)
        texts = " ".join(t.get_text() for t in fig.findobj(plt.Text))
        for label in ("source", "target", "CUT generator", "PatchGAN", "patch MLP", "EMA teacher",
                      "student", "ClassMix", "prototypes", "PatchNCE + LSGAN", "PSC",
                      "feature distance", "CE on stylized source", "mixed CE weighted by $q$",
                      "CAM", "contrast + regulariser", "target contrast", "sg",
                      "stop-gradient", "gradient reaches G"):  # fmt: skip
            assert label in texts, label
    finally:
        plt.close(fig)
