"""Executed notebooks that stay honest: run them headless, clean their outputs, stamp, check.

``make reproduce`` executes notebooks 01-05 *in place* (``execute``), so the committed notebooks
show the outputs of the full toy run. Four rules keep those outputs honest:

1. **They come from a clean run.** A cell that raises stops the execution and nothing is
   written; error outputs never reach a committed notebook.
2. **They are portable.** Absolute paths of this machine in text outputs are rewritten (the
   repository root becomes a relative path, the home directory ``~``, temporary folders
   ``<tmp>``, the Python installation ``<python>``); a path the rewrite misses is an error that
   names the cell. Progress-bar noise is dropped: carriage-return (``\\r``) redraws keep only
   their final state, ANSI escape codes and widget outputs go.
3. **They are small.** A PNG wider than ``MAX_IMAGE_WIDTH`` pixels is downscaled to that width
   (Lanczos, aspect kept) and re-encoded, one still above ``MAX_IMAGE_BYTES`` gets a 256-colour
   palette; a notebook still above ``MAX_BYTES`` is an error that
   lists its largest outputs.
4. **They say what they were made from.** ``metadata["confeti"]`` records a hash of each code
   cell (markdown and outputs do not count), a hash of every ``results/`` file the kernel opened
   while it ran (recorded by an audit hook, so nothing has to be declared and nothing read can
   be forgotten), a hash of the ``toy()`` and ``paper()`` presets (the runs a notebook loads are
   trained from ``toy()`` and notebook 04 prints ``paper()`` beside it; a preset's *values*
   are hashed, so editing ``config.py``'s comments does not count), the commit, whether tracked
   files outside ``notebooks/`` had uncommitted changes, the date and whether it was a smoke run.
   ``stale_reasons`` compares that record with today's files. Every notebook records both
   presets, used or not: a preset change reruns all five (a few minutes once the runs exist).

What the record cannot see: the package code itself (hashing it would mark every notebook stale
at each refactor; the commit says which code made the outputs), the finished runs in ``runs/``
(not committed; they follow from the preset, the data and the code), and a ``results/`` file a
notebook only tests for existence without opening it.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root
WATCHED = ("results",)  # folders under ROOT whose files a notebook's outputs depend on
PRESETS = ("toy", "paper")  # presets whose values the outputs depend on
MAX_BYTES = 3_000_000  # a committed notebook stays under this size
MAX_IMAGE_WIDTH = 1000  # PNG outputs wider than this (pixels) are downscaled to it (GitHub: ~900)
MAX_IMAGE_BYTES = 200_000  # a PNG still larger is re-encoded with a 256-colour palette
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}
STALE = "outputs are stale: rerun make reproduce"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_WIDGET = "application/vnd.jupyter.widget-view+json"
# absolute paths that should never be left in an output, whatever machine wrote it
_FOREIGN = re.compile(r"(?<![\w.~>-])(?:/(?:work|home|tmp|Users|root|mnt|scratch|private/var|var/folders)/|[A-Za-z]:\\Users\\)")  # fmt: skip


# ---- hashes and the record ------------------------------------------------------------------


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def code_cells(nb) -> list[tuple[int, str]]:
    """(cell index, source) of every code cell, in order."""
    return [(i, _source(c)) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def _source(cell) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


def code_hashes(nb) -> list[str]:
    """One short sha256 per code cell source: what a notebook's outputs are a function of."""
    return [_sha(s)[:16] for _, s in code_cells(nb)]


def input_hash(key: str, root: Path = ROOT) -> str | None:
    """sha256 of one input: ``config.<preset>()`` (the preset's values) or a file under ``root``.

    None when the file does not exist (any more).
    """
    if key.startswith("config."):
        from . import config

        values = dataclasses.asdict(config.get_preset(key[len("config.") : -2]))
        return _sha(json.dumps(values, sort_keys=True, default=str))
    p = Path(root) / key
    return _sha(p.read_bytes()) if p.is_file() else None


def _git(root: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def stamp(nb, reads, root: Path = ROOT, smoke: bool = False) -> dict:
    """Write ``metadata["confeti"]``: what the outputs of ``nb`` were made from.

    ``reads``: the files (relative to ``root``) the kernel opened under ``WATCHED``.
    """
    keys = sorted(set(reads)) + [f"config.{p}()" for p in PRESETS]
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!notebooks")
    record = {
        "code_cells": code_hashes(nb),
        "inputs": {k: input_hash(k, root) for k in keys},
        "commit": _git(root, "rev-parse", "HEAD") or None,
        "dirty": bool(dirty),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": smoke,
        "python": sys.version.split()[0],
    }
    nb["metadata"]["confeti"] = record
    return record


def has_outputs(nb) -> bool:
    return any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


def stale_reasons(path, root: Path = ROOT) -> list[str]:
    """Why the outputs of the notebook at ``path`` no longer match its code and inputs.

    Empty when they match, and for a notebook without outputs and without a record (never
    executed in place). Code cells are compared one by one, so the reasons name the cells.
    """
    nb = _read(path)
    meta = nb["metadata"].get("confeti")
    if meta is None:
        return ["it has outputs but no metadata['confeti']"] if has_outputs(nb) else []
    reasons = []
    if not has_outputs(nb):
        reasons.append("metadata['confeti'] is there but no cell has outputs (stripped?)")
    old, new = meta.get("code_cells", []), code_hashes(nb)
    cells = [i for i, _ in code_cells(nb)]
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        now = ", ".join(f"[{cells[j]}]" for j in range(b0, b1))
        if op == "replace":
            reasons.append(f"code cell(s) {now} changed")
        elif op == "insert":
            reasons.append(f"code cell(s) {now} added")
        elif op == "delete":
            where = f"before cell [{cells[b0]}]" if b0 < len(cells) else "at the end"
            reasons.append(f"{a1 - a0} code cell(s) removed {where}")
    for key, h in meta.get("inputs", {}).items():
        now_h = input_hash(key, root)
        if now_h is None and h is not None:
            reasons.append(f"{key} was read but no longer exists")
        elif now_h != h:
            reasons.append(f"{key} changed")
    return reasons


# ---- cleaning the outputs --------------------------------------------------------------------


def machine_paths(root: Path = ROOT, extra: dict | None = None) -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) pairs that turn this machine's absolute paths into portable text.

    Longest prefix first: ``root/x`` -> ``x``, ``root`` -> ``.``, a temporary folder
    ``<tmpdir>/name`` -> ``<tmp>``, the Python installation -> ``<python>``, home -> ``~``.
    ``extra``: more {absolute prefix: replacement} (e.g. a runs folder outside the repository).
    """
    end = r"(?![\w.-])"  # the prefix ends here: a separator, a quote, a space or the end
    pairs = {}
    for prefix, label in (extra or {}).items():
        pairs[str(prefix).rstrip("/")] = (None, label)
    for r in {str(root), os.path.realpath(root)}:
        pairs[r] = (re.compile(re.escape(r) + r"(?:/|" + end + ")"), "")
    for t in {tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())}:
        pairs[t] = (re.compile(re.escape(t) + r"(?:/[^/\s'\"(),:;\[\]]+)?" + end), "<tmp>")
    for p in {sys.prefix, sys.base_prefix, os.path.realpath(sys.prefix)}:
        pairs.setdefault(p, (None, "<python>"))
    pairs.setdefault(os.path.expanduser("~"), (None, "~"))
    out = []
    for prefix in sorted(pairs, key=len, reverse=True):
        if len(prefix) <= 1:  # never rewrite "/" itself
            continue
        pattern, label = pairs[prefix]
        out.append((pattern or re.compile(re.escape(prefix) + end), label))
    return out


def _rewrite(text: str, pairs) -> str:
    for pattern, label in pairs:
        if label == "":  # the repository root: "root/x" -> "x", a bare "root" -> "."
            text = pattern.sub(lambda m: "" if m.group(0).endswith("/") else ".", text)
        else:
            text = pattern.sub(label, text)
    return text


def _collapse(text: str) -> str:
    # a terminal redraws a line after each \r: keep what it finally shows, drop escape codes
    text = _ANSI.sub("", text.replace("\r\n", "\n"))
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _shrink_png(
    b64: str, max_width: int = MAX_IMAGE_WIDTH, max_bytes: int = MAX_IMAGE_BYTES
) -> str:
    """Downscale a PNG wider than ``max_width`` (Lanczos, aspect kept); if it is still larger than
    ``max_bytes``, re-encode it with a 256-colour palette (image grids of noisy toy scenes
    compress badly in RGB; a palette keeps them readable at a third of the size)."""
    from PIL import Image

    raw = base64.b64decode(b64)
    img = Image.open(io.BytesIO(raw))
    if img.width <= max_width and len(raw) <= max_bytes:
        return b64
    if img.width > max_width:
        img = img.convert("RGBA").resize(
            (max_width, max(1, round(img.height * max_width / img.width))), Image.LANCZOS
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if buf.tell() > max_bytes:
        buf = io.BytesIO()
        img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
            buf, format="PNG", optimize=True
        )
    return base64.b64encode(buf.getvalue()).decode()


def _texts(output):
    """(key, text) of every text an output shows (images excluded)."""
    if output["output_type"] == "stream":
        yield "text", output["text"]
    for mime, v in output.get("data", {}).items():
        if isinstance(v, str) and (not mime.startswith("image/") or mime == "image/svg+xml"):
            yield mime, v
    if output["output_type"] == "error":
        yield "traceback", "\n".join(output.get("traceback", []))


def clean(nb, root: Path = ROOT, extra: dict | None = None):
    """Clean the outputs of an executed notebook in place (rules 1-3 of the module docstring).

    Raises ValueError naming the cell for an error output or an absolute path left behind.
    """
    pairs = machine_paths(root, extra)
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        cell.get("metadata", {}).pop("execution", None)
        outputs, shown = [], set()
        for o in cell.get("outputs", []):
            if o["output_type"] == "error":
                raise ValueError(f"cell [{i}] raised {o.get('ename')}: {o.get('evalue')}")
            if o["output_type"] == "stream":
                if outputs and outputs[-1]["output_type"] == "stream" and outputs[-1]["name"] == o["name"]:  # fmt: skip
                    outputs[-1]["text"] += o["text"]  # one stream output per run of writes
                    continue
                outputs.append(o)
                continue
            data = o.get("data", {})
            if _WIDGET in data:  # a widget (tqdm.auto's bar): its text fallback is a 0 % bar
                continue
            if "image/png" in data:
                if data["image/png"] in shown:  # the inline backend's copy of a returned figure
                    continue
                shown.add(data["image/png"])
                data["image/png"] = _shrink_png(data["image/png"])
            if o["output_type"] in ("display_data", "execute_result") and not data:
                continue
            for mime, v in data.items():
                if isinstance(v, str) and (not mime.startswith("image/") or mime == "image/svg+xml"):  # fmt: skip
                    data[mime] = _rewrite(v, pairs)
            outputs.append(o)
        for o in outputs:
            if o["output_type"] == "stream":
                o["text"] = _rewrite(_collapse(o["text"]), pairs)
        cell["outputs"] = [o for o in outputs if o["output_type"] != "stream" or o["text"]]
    nb["metadata"].pop("widgets", None)
    nb["metadata"]["kernelspec"] = dict(KERNEL)
    nb["metadata"]["language_info"] = {"name": "python"}
    left = path_problems(nb, root)
    if left:
        raise ValueError("absolute paths left in the outputs: " + "; ".join(left))
    return nb


def path_problems(nb, root: Path = ROOT) -> list[str]:
    """'cell [i]: ...' for every output text that still holds an absolute path of a machine."""
    own = {str(root), os.path.realpath(root), os.path.expanduser("~"), tempfile.gettempdir()}
    own = [re.compile(r"(?<![\w.~>-])" + re.escape(p) + r"(?![\w.-])") for p in own if len(p) > 1]
    found = []
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            for _, text in _texts(o):
                m = next((m for r in (_FOREIGN, *own) if (m := r.search(text))), None)
                hit = m and m.group(0)
                if hit:
                    line = next(ln for ln in text.splitlines() if hit in ln)
                    found.append(f"cell [{i}]: {line.strip()[:120]!r}")
                    break
    return found


def problems(path, root: Path = ROOT, allow_smoke: bool = False) -> list[str]:
    """What a committed notebook must not have, whether executed or not: error outputs,
    absolute paths, more than ``MAX_BYTES``, a kernelspec other than ``python3``, ``\\r``
    progress redraws, smoke-run outputs (unless ``allow_smoke``)."""
    path = Path(path)
    nb = _read(path)
    out = []
    size = path.stat().st_size
    if size > MAX_BYTES:
        out.append(f"{size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")
    if nb["metadata"].get("kernelspec", {}).get("name") != "python3":
        out.append(
            f"kernelspec {nb['metadata'].get('kernelspec', {}).get('name')!r}, not 'python3'"
        )
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            if o["output_type"] == "error":
                out.append(f"cell [{i}] has an error output ({o.get('ename')})")
            if o["output_type"] == "stream" and "\r" in o["text"]:
                out.append(f"cell [{i}] has carriage-return progress output")
    out += [f"absolute path in {p}" for p in path_problems(nb, root)]
    if nb["metadata"].get("confeti", {}).get("smoke") and not allow_smoke:
        out.append("its outputs come from a smoke run (CONFETI_SMOKE=1), not the full toy run")
    return out


# ---- execution ---------------------------------------------------------------------------------


def record_reads(log: str, watched: list[str]) -> None:
    """Run in the kernel before the first cell: append to ``log`` every file opened under one of
    the ``watched`` folders (an audit hook on ``open``, which ``open``, ``Path.read_text``,
    ``json.load(open(...))``, numpy and pandas all go through)."""
    watched = [os.path.realpath(w) + os.sep for w in watched]
    seen = set()

    def hook(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        p = os.path.realpath(os.fsdecode(args[0]))
        if p not in seen and any(p.startswith(w) for w in watched):
            seen.add(p)
            with open(log, "a") as f:  # re-enters the hook with a path outside `watched`
                f.write(p + "\n")

    sys.addaudithook(hook)


def _read(path):
    import nbformat

    return nbformat.read(str(path), as_version=4)


def execute(
    path,
    out=None,
    env: dict | None = None,
    root: Path = ROOT,
    timeout: int = 1800,
    max_bytes: int = MAX_BYTES,
):
    """Execute the notebook at ``path`` headless and write it, outputs cleaned and stamped, to
    ``out`` (default: back into ``path``). Returns the written notebook.

    ``env``: the kernel's environment (default ``os.environ``), e.g. ``CONFETI_RUNS``,
    ``CONFETI_DATA``, ``CONFETI_FIGURES``; ``MPLBACKEND`` is removed so that figures are drawn
    inline into the outputs. The kernel runs in the notebook's folder. Nothing is written when a
    cell raises, an absolute path survives the cleaning or the result is over ``max_bytes``.
    """
    import nbformat
    from nbclient import NotebookClient

    path, root = Path(path), Path(root)
    out = Path(out) if out is not None else path
    nb = _read(path)
    for cell in nb["cells"]:  # start from a stripped notebook
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    kernel_env = dict(os.environ if env is None else env)
    kernel_env.pop("MPLBACKEND", None)
    fd, log = tempfile.mkstemp(prefix="confeti_reads_", suffix=".txt")
    os.close(fd)
    watched = [str(root / w) for w in WATCHED]
    hook = f"from confeti.notebooks import record_reads as _r; _r({log!r}, {watched!r}); del _r"
    try:
        NotebookClient(
            nb,
            kernel_name="python3",
            timeout=timeout,
            allow_errors=False,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent.resolve())}},
            extra_arguments=[f"--IPKernelApp.exec_lines={hook}"],
        ).execute(env=kernel_env)
        lines = Path(log).read_text().splitlines()
    finally:
        os.unlink(log)
    extra = {
        os.path.realpath(v): f"${k}"
        for k, v in kernel_env.items()
        if k.startswith("CONFETI_") and os.path.isabs(v)
        and not os.path.realpath(v).startswith(os.path.realpath(root) + os.sep)
    }  # fmt: skip
    clean(nb, root, extra)
    real_root = Path(os.path.realpath(root))
    reads = [Path(p).relative_to(real_root).as_posix() for p in lines]
    stamp(nb, reads, root, smoke=kernel_env.get("CONFETI_SMOKE") == "1")
    text = nbformat.writes(nb)
    text += "" if text.endswith("\n") else "\n"
    if len(text.encode()) > max_bytes:
        sizes = sorted(
            ((len(json.dumps(c.get("outputs", []))), i) for i, c in enumerate(nb["cells"])),
            reverse=True,
        )[:3]
        big = ", ".join(f"cell [{i}] {n / 1e6:.1f} MB" for n, i in sizes)
        raise ValueError(f"{path.name}: {len(text) / 1e6:.1f} MB of outputs, over {max_bytes / 1e6:.0f} MB ({big})")  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return nb
