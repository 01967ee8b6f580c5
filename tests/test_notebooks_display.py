"""Every figure in the notebooks shows exactly once, wherever its ``show(...)`` sits in a cell.

The figure functions of ``confeti/plots.py`` draw inside ``plt.rc_context``, which leaves pyplot
non-interactive: a figure returned as a cell's value was drawn twice (once as the value, once
more when the inline backend flushed the open figures at the end of the cell), and one whose
``show(...)`` was not the cell's last line was not drawn at all. Each notebook's
``show(fig, name=None)`` therefore saves the figure (when ``$CONFETI_FIGURES`` is set and a name
is given), displays it itself and closes it, and returns None.

This file runs the notebooks: it executes a copy of each one in smoke mode (``CONFETI_SMOKE=1``,
a few tens of seconds each, once per module) with nbclient directly, not with
``confeti.notebooks.execute``, whose cleaning drops an image repeated within a cell, and counts
the raw outputs.
"""

import ast
import os
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PNG = "image/png"
pytestmark = pytest.mark.notebooks  # executes the notebooks (deselect with -m "not notebooks")
# statements whose body may run zero times: a show() inside them need not have run
BRANCHES = (ast.If, ast.For, ast.While, ast.Try, ast.FunctionDef, ast.ClassDef, ast.Match)


def _python(code: str) -> str:
    # a notebook cell may hold IPython magics or shell lines; they are not python
    return "\n".join(ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!")))


def _show_calls(node) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "show"
    ]


def show_calls(code: str) -> tuple[list[ast.Call], list[ast.Call]]:
    """(the show() calls a cell makes whenever it runs, all of its show() calls)."""
    body = ast.parse(_python(code)).body
    always = [c for stmt in body if not isinstance(stmt, BRANCHES) for c in _show_calls(stmt)]
    return always, [c for stmt in body for c in _show_calls(stmt)]


def figure_name(call: ast.Call) -> str | None:
    """The file name a show() call saves to: its second argument or ``name=``, a literal."""
    args = call.args[1:2] + [k.value for k in call.keywords if k.arg == "name"]
    return args[0].value if args and isinstance(args[0], ast.Constant) else None


def show_helper(path: Path) -> str:
    """The source text of the notebook's ``def show`` (comments included)."""
    nb = nbformat.read(path, as_version=4)
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        code = _python(cell.source)
        for node in ast.parse(code).body:
            if isinstance(node, ast.FunctionDef) and node.name == "show":
                found.append("\n".join(code.splitlines()[node.lineno - 1 : node.end_lineno]))
    assert len(found) == 1, f"{path.name}: {len(found)} definitions of show(), expected 1"
    return found[0]


@pytest.fixture(scope="module", params=NOTEBOOKS, ids=lambda p: p.name)
def executed(request, tmp_path_factory):
    """(notebook, figures folder) of a copy of the notebook executed in smoke mode.

    The copy sits in ``<tmp>/notebooks/``, so the notebook's repository root is ``<tmp>`` and
    nothing of this checkout's ``runs/`` is read; ``$CONFETI_FIGURES`` is a folder of its own.
    """
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp(request.param.stem)
    copy = tmp / "notebooks" / request.param.name
    copy.parent.mkdir()
    shutil.copyfile(request.param, copy)
    nb = nbformat.read(copy, as_version=4)
    figures = tmp / "figures"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFETI_")}
    env.pop("MPLBACKEND", None)  # the inline backend, as in Jupyter: figures become PNG outputs
    env.update(CONFETI_SMOKE="1", CONFETI_FIGURES=str(figures), OMP_NUM_THREADS="1")
    NotebookClient(
        nb,
        kernel_name="python3",
        timeout=1800,  # a hang guard per cell, not a speed requirement
        allow_errors=False,
        resources={"metadata": {"path": str(copy.parent)}},
    ).execute(env=env)
    return nb, figures


def _code_cells(nb):
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def _images(cell) -> list[str]:
    return [o["data"][PNG] for o in cell.outputs if PNG in o.get("data", {})]


def test_no_cell_shows_the_same_image_twice(executed):
    nb, _ = executed
    for i, cell in _code_cells(nb):
        images = _images(cell)
        assert len(images) == len(set(images)), f"cell [{i}] shows an image twice:\n{cell.source}"


def test_every_cell_that_calls_show_shows_a_figure(executed):
    nb, _ = executed
    checked = 0
    for i, cell in _code_cells(nb):
        always, _ = show_calls(cell.source)
        if always:
            checked += 1
            assert len(_images(cell)) >= 1, f"cell [{i}] calls show() but shows no image:\n{cell.source}"  # fmt: skip
    assert checked, "no cell calls show(): nothing was checked"


def test_no_figure_is_shown_as_a_cell_value(executed):
    # show() returns None: every image is a display_data output, none is a cell's value
    nb, _ = executed
    for i, cell in _code_cells(nb):
        values = [o for o in cell.outputs if o["output_type"] == "execute_result"]
        assert not [o for o in values if PNG in o.get("data", {})], (
            f"cell [{i}] shows a figure as its value; call show(...) on it:\n{cell.source}"
        )


def test_show_writes_exactly_the_named_figures(executed):
    nb, figures = executed
    named_always, named_all = set(), set()
    for _, cell in _code_cells(nb):
        always, every = show_calls(cell.source)
        named_always |= {figure_name(c) for c in always} - {None}
        named_all |= {figure_name(c) for c in every} - {None}
    written = {p.name for p in figures.iterdir()} if figures.exists() else set()
    assert named_always <= written <= named_all, (written, named_always, named_all)


def test_show_is_the_same_function_in_every_notebook():
    helpers = {p.name: show_helper(p) for p in NOTEBOOKS}
    assert len(helpers) > 1
    first = next(iter(helpers.values()))
    assert "display(fig)" in first and "plt.close(fig)" in first and "return" not in first
    different = [name for name, src in helpers.items() if src != first]
    assert not different, f"show() differs from {NOTEBOOKS[0].name}'s in {different}"
