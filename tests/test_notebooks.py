"""Executed notebooks stay honest (confeti/notebooks.py): the committed notebooks' outputs match
their code and inputs, hold no errors, no absolute paths, no progress noise, and stay small.

The rule for committed notebooks (docs/contributing.md): a notebook without outputs and without
``metadata["confeti"]`` passes (it was never executed in place); one with either must have both,
and its record must match today's code cells and inputs. A notebook listed in ``EXECUTED`` must
carry its outputs, so a stripped notebook cannot pass silently once executed ones are committed.
"""

import base64
import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from confeti import notebooks as nbs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# the notebooks committed with the outputs of the full toy run (`make reproduce`); add a name
# here when you commit its executed version, so that stripping it later fails this file
EXECUTED: tuple[str, ...] = (
    "01_data.ipynb",
    "02_pixel_alignment.ipynb",
    "03_feature_alignment.ipynb",
    "04_joint_training.ipynb",
    "05_prototype_tsne.ipynb",
)


# ---- the committed notebooks --------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_outputs_are_fresh(path):
    reasons = nbs.stale_reasons(path)
    assert not reasons, f"{path.name}: {nbs.STALE} ({'; '.join(reasons)})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    # no error outputs, no absolute paths, under 3 MB, kernelspec python3, no smoke-run outputs
    assert nbs.problems(path) == [], f"{path.name}: {nbs.problems(path)}"


def test_listed_notebooks_are_committed_executed():
    assert NOTEBOOKS, "no notebook found"
    for name in EXECUTED:
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        assert nbs.has_outputs(nb) and "confeti" in nb.metadata, (
            f"{name} is listed as committed executed but has no outputs or no record: {nbs.STALE}"
        )


def test_make_test_runs_the_notebooks_without_writing_them_back():
    # nbmake writes a notebook back only with --overwrite
    test_recipe = (ROOT / "Makefile").read_text().split("\ntest:")[1].split("\n\n")[0]
    assert "--nbmake" in test_recipe and "--overwrite" not in test_recipe


# ---- the record and the staleness check on synthetic notebooks -----------------------------


def _notebook(code=("x = 1", "print(x)")):
    cells = [new_markdown_cell("# a title")]
    for i, src in enumerate(code, 1):
        cell = new_code_cell(src, execution_count=i)
        cell.outputs = [new_output("stream", name="stdout", text=f"out {i}\n")]
        cells += [cell, new_markdown_cell(f"prose {i}")]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = dict(nbs.KERNEL)
    return nb


def _write(nb, path):
    nbformat.write(nb, str(path))
    return path


def test_code_edits_make_a_notebook_stale_markdown_and_outputs_do_not(tmp_path):
    nb = _notebook()
    nbs.stamp(nb, [], root=tmp_path)
    path = _write(nb, tmp_path / "t.ipynb")
    assert nbs.stale_reasons(path, root=tmp_path) == []

    nb.cells[0].source = "# another title"  # markdown
    nb.cells[2].source += "\nmore prose"
    assert nbs.stale_reasons(_write(nb, path), root=tmp_path) == []

    nb.cells[1].outputs[0].text = "something else\n"  # output-only fields
    nb.cells[1].execution_count = 7
    nb.cells[1].metadata["collapsed"] = True
    assert nbs.stale_reasons(_write(nb, path), root=tmp_path) == []

    nb.cells[3].source = "print(x + 1)"  # a code cell
    reasons = nbs.stale_reasons(_write(nb, path), root=tmp_path)
    assert reasons == ["code cell(s) [3] changed"]

    nb.cells[3].source = "print(x)"  # back as it was: fresh again
    assert nbs.stale_reasons(_write(nb, path), root=tmp_path) == []
    nb.cells.insert(1, new_code_cell("import os"))
    assert nbs.stale_reasons(_write(nb, path), root=tmp_path) == ["code cell(s) [1] added"]


def test_results_and_preset_changes_make_a_notebook_stale(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    res = tmp_path / "results" / "a.json"
    res.write_text('{"miou": 1.0}')
    nb = _notebook()
    record = nbs.stamp(nb, ["results/a.json"], root=tmp_path)
    assert set(record["inputs"]) == {"results/a.json", "config.toy()", "config.paper()"}
    path = _write(nb, tmp_path / "t.ipynb")
    assert nbs.stale_reasons(path, root=tmp_path) == []

    res.write_text('{"miou": 2.0}')
    assert nbs.stale_reasons(path, root=tmp_path) == ["results/a.json changed"]
    res.unlink()
    assert nbs.stale_reasons(path, root=tmp_path) == ["results/a.json was read but no longer exists"]  # fmt: skip
    res.write_text('{"miou": 1.0}')
    assert nbs.stale_reasons(path, root=tmp_path) == []

    from confeti import config

    toy = config.toy
    monkeypatch.setattr(config, "toy", lambda: toy().__class__(**{**toy().to_dict(), "iters": 1}))
    assert nbs.stale_reasons(path, root=tmp_path) == ["config.toy() changed"]


def test_outputs_without_a_record_and_a_record_without_outputs_are_stale(tmp_path):
    nb = _notebook()
    path = _write(nb, tmp_path / "t.ipynb")
    assert nbs.stale_reasons(path, root=tmp_path) == ["it has outputs but no metadata['confeti']"]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    assert nbs.stale_reasons(_write(nb, path), root=tmp_path) == []  # stripped, never executed
    nbs.stamp(nb, [], root=tmp_path)
    reasons = nbs.stale_reasons(_write(nb, path), root=tmp_path)
    assert len(reasons) == 1 and "stripped" in reasons[0]


# ---- cleaning the outputs ---------------------------------------------------------------------


def _png(width, height):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_clean_rewrites_paths_collapses_progress_and_shrinks_images(tmp_path):
    tmp = tempfile.gettempdir()
    cell = new_code_cell("...")
    cell.outputs = [
        new_output("stream", name="stdout", text=f"runs in {ROOT}/runs/toy\n"),
        new_output("stream", name="stdout", text=f"data in {tmp}/toystreets_ab12/source\n"),
        new_output("stream", name="stderr", text="\r 10%|#  |\r 50%|### |\r100%|#####|\n"),
        new_output("stream", name="stderr", text="\x1b[Adone\n"),
        new_output("display_data", data={"text/plain": f"'{os.path.expanduser('~')}/x'"}),
        new_output("display_data", data={"text/plain": "0%", nbs._WIDGET: {"model_id": "1"}}),
        new_output("display_data", data={"image/png": _png(3000, 60), "text/plain": "fig"}),
        new_output("display_data", data={"image/png": _png(300, 60), "text/plain": "fig"}),
    ]
    nb = new_notebook(cells=[cell])
    nbs.clean(nb, root=ROOT)
    out = nb.cells[0].outputs
    assert [o.output_type for o in out] == ["stream", "stream", "display_data"] + ["display_data"] * 2  # fmt: skip
    assert out[0].text == "runs in runs/toy\ndata in <tmp>/source\n"  # consecutive writes merged
    assert out[1].text == "100%|#####|\ndone\n"  # only the last redraw, no escape codes
    assert out[2].data["text/plain"] == "'~/x'"
    from PIL import Image

    widths = [Image.open(io.BytesIO(base64.b64decode(o.data["image/png"]))).width for o in out[3:]]
    assert widths == [nbs.MAX_IMAGE_WIDTH, 300]
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nbs.path_problems(nb) == []


@pytest.mark.parametrize(
    "output",
    [
        new_output("stream", name="stdout", text="checkpoint at /home/someone/else/ckpt.pt\n"),
        new_output("execute_result", data={"text/plain": "PosixPath('/work/other/x')"}),
    ],
)
def test_clean_refuses_foreign_absolute_paths_and_names_the_cell(output):
    nb = new_notebook(cells=[new_markdown_cell("m"), new_code_cell("x", outputs=[output])])
    with pytest.raises(ValueError, match=r"cell \[1\]"):
        nbs.clean(nb, root=Path("/nonexistent/repo"))


def test_clean_refuses_error_outputs():
    err = new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])
    nb = new_notebook(cells=[new_code_cell("1/0", outputs=[err])])
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        nbs.clean(nb)


def test_problems_lists_what_a_committed_notebook_must_not_have(tmp_path):
    nb = _notebook()
    nb.cells[1].outputs.append(new_output("error", ename="KeyError", evalue="k", traceback=[]))
    nb.cells[3].outputs[0].text = "\r 5%\r 9%\n/tmp/x/y\n"
    nb.metadata["kernelspec"] = {"name": "conda-env", "display_name": "x", "language": "python"}
    nbs.stamp(nb, [], root=tmp_path, smoke=True)
    found = " | ".join(nbs.problems(_write(nb, tmp_path / "t.ipynb"), root=tmp_path))
    for what in ("error output", "carriage-return", "absolute path in cell [3]", "conda-env", "smoke"):  # fmt: skip
        assert what in found


# ---- execution, end to end (one small kernel) ---------------------------------------------------


def test_execute_writes_clean_stamped_outputs_and_records_the_results_it_read(tmp_path):
    root = tmp_path / "repo"
    (root / "results").mkdir(parents=True)
    (root / "results" / "read.json").write_text('{"miou": 41.0}')
    (root / "results" / "unread.json").write_text("{}")
    (root / "nb").mkdir()
    nb = new_notebook(
        cells=[
            new_markdown_cell("# t"),
            new_code_cell(
                "import json, os, sys, tempfile\n"
                "from pathlib import Path\n"
                "print(json.loads(Path('../results/read.json').read_text())['miou'])\n"
                "print(Path.cwd(), tempfile.mkdtemp(prefix='toy_'), os.environ['CONFETI_RUNS'])\n"
                "for i in range(3):\n"
                "    sys.stderr.write(f'\\r{i + 1}/3')\n"
                "sys.stderr.write('\\n')"
            ),
            new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1])\nplt.gcf()"),
        ]
    )
    nb.metadata["kernelspec"] = dict(nbs.KERNEL)
    path = _write(nb, root / "nb" / "t.ipynb")
    env = dict(os.environ, CONFETI_RUNS=str(root / "runs" / "toy"), MPLBACKEND="Agg")
    nbs.execute(path, env=env, root=root, timeout=600)

    written = nbformat.read(str(path), as_version=4)
    out = written.cells[1].outputs
    assert out[0].text == "41.0\nnb <tmp> runs/toy\n"
    assert out[1].text == "3/3\n"
    assert "image/png" in written.cells[2].outputs[0].data  # inline figures, not Agg
    meta = written.metadata["confeti"]
    assert set(meta["inputs"]) == {"results/read.json", "config.toy()", "config.paper()"}
    assert meta["smoke"] == (os.environ.get("CONFETI_SMOKE") == "1")
    assert nbs.stale_reasons(path, root=root) == []
    assert nbs.problems(path, root=root, allow_smoke=True) == []

    (root / "results" / "read.json").write_text('{"miou": 42.0}')
    assert nbs.stale_reasons(path, root=root) == ["results/read.json changed"]
    (root / "results" / "unread.json").write_text('{"x": 1}')  # not read: does not count
    assert nbs.stale_reasons(path, root=root) == ["results/read.json changed"]


def test_execute_writes_nothing_when_a_cell_raises(tmp_path):
    nb = new_notebook(cells=[new_code_cell("print('ok')"), new_code_cell("1 / 0")])
    nb.metadata["kernelspec"] = dict(nbs.KERNEL)
    path = _write(nb, tmp_path / "t.ipynb")
    before = path.read_bytes()
    with pytest.raises(Exception, match="ZeroDivisionError"):
        nbs.execute(path, root=tmp_path, timeout=600)
    assert path.read_bytes() == before


def test_reproduce_executes_the_notebooks_in_place_with_the_full_run_environment(tmp_path, monkeypatch):  # fmt: skip
    from confeti import figures, notebooks, reproduce, toystreets

    data, runs, nbdir = tmp_path / "data", tmp_path / "runs", tmp_path / "notebooks"
    data.mkdir()
    (data / "toystreets.json").write_text(json.dumps({"version": toystreets.VERSION}))
    reproduce._check_benchmark(data, runs / "toy")  # the record a first reproduce writes
    for m in reproduce.FIGURE_RUNS:
        (runs / "toy" / m).mkdir(parents=True)
        (runs / "toy" / m / "eval.json").write_text(json.dumps({"miou": 1.0}))
    nbdir.mkdir()
    _write(_notebook(), nbdir / "01_data.ipynb")
    calls = []
    monkeypatch.setattr(notebooks, "execute", lambda p, env, **kw: calls.append((Path(p), env)))
    monkeypatch.setattr(figures, "write_figures", lambda *a, **kw: None)
    monkeypatch.setenv("CONFETI_SMOKE", "1")
    reproduce.reproduce(data, runs, tmp_path / "figures", notebooks_dir=nbdir)
    assert [p for p, _ in calls] == [nbdir / "01_data.ipynb"]  # in place, the others are absent
    env = calls[0][1]
    assert "CONFETI_SMOKE" not in env and env["CONFETI_RUNS"] == str((runs / "toy").resolve())
    assert env["CONFETI_FIGURES"] == str((tmp_path / "figures").resolve())


def test_reproduce_refuses_a_finished_run_of_another_config(tmp_path):
    from confeti import reproduce, toystreets
    from confeti.config import toy

    data, runs = tmp_path / "data", tmp_path / "runs"
    data.mkdir()
    (data / "toystreets.json").write_text(json.dumps({"version": toystreets.VERSION}))
    old = dataclasses.replace(toy(), iters=toy().iters + 1)
    out = runs / "toy" / "confeti"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"method": "confeti", "config": old.to_dict()}))
    (out / "eval.json").write_text(json.dumps({"miou": 1.0}))
    with pytest.raises(SystemExit, match=r"confeti holds a run of another config \(iters"):
        reproduce.reproduce(data, runs, tmp_path / "figures", notebooks_dir=tmp_path / "nb")


def test_reproduce_refuses_data_of_another_toystreets_version(tmp_path, monkeypatch):
    from confeti import reproduce, toystreets

    data = tmp_path / "data"
    data.mkdir()
    (data / "toystreets.json").write_text(json.dumps({"version": toystreets.VERSION}))
    reproduce._check_benchmark(data, tmp_path / "runs")  # the current version passes
    monkeypatch.setattr(toystreets, "VERSION", toystreets.VERSION + 1)
    with pytest.raises(SystemExit, match=r"toystreets.json is ToyStreets version \d+, and this"):
        reproduce._check_benchmark(data, tmp_path / "runs")


def test_reproduce_refuses_runs_trained_on_another_toystreets(tmp_path):
    from confeti import reproduce, toystreets

    a, b, runs = tmp_path / "a", tmp_path / "b", tmp_path / "runs" / "toy"
    for d, seed in ((a, 0), (b, 1)):
        d.mkdir()
        (d / "toystreets.json").write_text(
            json.dumps({"version": toystreets.VERSION, "seed": seed})
        )
    reproduce._check_benchmark(a, runs)  # first use: recorded
    reproduce._check_benchmark(a, runs)  # same data: fine
    with pytest.raises(SystemExit, match="trained on another ToyStreets"):
        reproduce._check_benchmark(b, runs)
    (runs / "benchmark.json").unlink()  # finished runs without a record are refused too
    (runs / "confeti").mkdir()
    (runs / "confeti" / "eval.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"finished runs \(confeti\) without a record"):
        reproduce._check_benchmark(a, runs)


def test_reproduce_trains_the_figure_runs_in_parallel_sharing_phase_0(toy, tmp_path, monkeypatch):
    from confeti import figures, reproduce

    monkeypatch.setattr(figures, "write_figures", lambda *a, **kw: None)
    runs = tmp_path / "runs"
    reproduce.reproduce(toy, runs, tmp_path / "figures", preset="smoke", notebooks_dir=tmp_path)
    for m in reproduce.FIGURE_RUNS:
        assert json.loads((runs / "smoke" / m / "eval.json").read_text())["miou"] >= 0
    # style and confeti ran phase 0 once: one cache entry for the two runs with G
    assert len(list((runs / "smoke" / "cut_cache").glob("*.pt"))) == 1


def test_a_large_png_gets_a_palette_and_shrinks():
    from PIL import Image

    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (500, 900, 3), dtype=np.uint8))  # incompressible
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    assert buf.tell() > nbs.MAX_IMAGE_BYTES
    out = base64.b64decode(nbs._shrink_png(base64.b64encode(buf.getvalue()).decode()))
    img = Image.open(io.BytesIO(out))
    assert img.mode == "P" and img.size == (900, 500) and len(out) < buf.tell() / 2
