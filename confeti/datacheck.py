"""Full verification of a dataset folder: every image and label decoded once, before training.

The readers in ``datasets.py`` check the folder layout from file headers when they open it (a
missing folder, an image without label, a size mismatch: seconds for 25k files). A header says
nothing about the bytes behind it: a PNG cut short after its header passes that check and would
crash a paper-scale run hours later, on the first batch that draws it. ``verify`` closes the gap:

- every image is fully decoded and must be a PNG of 3 (or 4) channels;
- every label is fully decoded, must be a PNG of label ids (one channel; 16-bit RGB(A) for
  SYNTHIA, class id in channel 0), the size of its image, and hold only the dataset's legal ids
  (``LEGAL_IDS`` of its reader: Cityscapes label ids 0..33 for GTA5 and Cityscapes, SYNTHIA's
  class ids 0..22);
- results are cached per file pair by (relative path, size, modification time) in
  ``ROOT/.confeti_check.json`` (or under ``~/.cache/confeti/check/`` when ROOT is read-only), so
  the full decode is paid once (about an hour for GTA5's 24,966 frames on 2 cores, less on more)
  and a ``stat`` per file afterwards; a file
  that changes on disk is verified again;
- one process writes the cache: an exclusive lock on ``<cache>.lock`` is held while verifying, so
  two ablation processes or the ranks of a ``torchrun`` job that start on the same folder verify
  it once (the others wait, then read the cache); the cache file is replaced atomically;
- the work runs in parallel over the cores (processes) when there are many files.

``python -m confeti data check --data DIR`` runs it alone; ``train`` runs it before the first
iteration unless ``--skip-data-check``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .datasets import DatasetError, _SegDataset
from .labels import CLASSES, IGNORE_INDEX

CACHE_NAME = ".confeti_check.json"
CACHE_VERSION = 1  # bump when what is verified changes: old caches are then ignored
PARALLEL_FROM = 64  # fewer pending pairs than this are verified in this process
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class CheckReport:
    """What ``verify`` found in one dataset split."""

    name: str  # e.g. "gta5", "cityscapes/val"
    root: Path
    pairs: int = 0
    verified_now: int = 0
    from_cache: int = 0
    bad: list[tuple[Path, str]] = field(default_factory=list)  # (file, what is wrong)
    files_with_class: Counter = field(default_factory=Counter)  # train id -> files holding it

    @property
    def ok(self) -> bool:
        return not self.bad

    def describe(self) -> str:
        present = sorted(self.files_with_class)
        absent = [CLASSES[c] for c in range(len(CLASSES)) if c not in self.files_with_class]
        lines = [
            f"{self.name}: {self.pairs} image/label pairs ({self.verified_now} verified now, "
            f"{self.from_cache} from the cache), {len(present)}/{len(CLASSES)} classes present"
            + (f" (absent: {', '.join(absent)})" if absent else ""),
        ]
        lines += [f"  BAD {path}: {why}" for path, why in self.bad]
        return "\n".join(lines)


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def _decode_image(path: Path) -> tuple[int, int]:
    """Decode an image fully; its (W, H). Raises ValueError with what is wrong."""
    if not _is_png(path):
        raise ValueError("not a PNG file")
    try:
        with Image.open(path) as im:
            im.load()  # the whole file: a truncated one fails here, not at its header
            if im.mode not in ("RGB", "RGBA", "P", "L"):
                raise ValueError(f"image mode {im.mode}, expected an RGB PNG")
            return im.size
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means a damaged file
        raise ValueError(f"truncated or corrupt PNG ({e})") from e


def verify_pair(
    reader: type[_SegDataset], img: Path, lab: Path
) -> tuple[list[tuple[Path, str]], list[int]]:
    """Problems of one pair as (file, what is wrong), empty if good; the train ids it holds.

    Shape: the label must be (H, W) label ids with the image's (H, W).
    """
    problems = []
    size = None
    try:
        size = _decode_image(img)
    except (OSError, ValueError) as e:
        problems.append((img, str(e)))
    classes: list[int] = []
    try:
        if not _is_png(lab):
            raise ValueError("not a PNG file")
        try:
            ids = reader.read_label_ids(lab)  # full decode, (H, W) raw label ids
        except DatasetError as e:
            raise ValueError(str(e)) from e
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"truncated or corrupt PNG ({e})") from e
        if size is not None and (ids.shape[1], ids.shape[0]) != size:
            raise ValueError(f"label size {ids.shape[1]}x{ids.shape[0]} != image size {size[0]}x{size[1]}")  # fmt: skip
        values = np.unique(ids)
        illegal = [int(v) for v in values if int(v) not in reader.LEGAL_IDS]
        if illegal:
            lo, hi = min(reader.LEGAL_IDS), max(reader.LEGAL_IDS)
            shown = ", ".join(map(str, illegal[:8])) + (" ..." if len(illegal) > 8 else "")
            raise ValueError(f"label values out of range: {shown} (legal ids are {lo}..{hi})")
        train_ids = np.unique(reader.to_train_id(values))
        classes = [int(c) for c in train_ids if c != IGNORE_INDEX]
    except (OSError, ValueError) as e:
        problems.append((lab, str(e)))
    return problems, classes


def _verify_job(job):
    reader, img, lab = job
    return verify_pair(reader, img, lab)


def _cache_path(root: Path) -> Path:
    """ROOT/.confeti_check.json if ROOT is writable, else a per-user cache file."""
    if os.access(root, os.W_OK):
        return root / CACHE_NAME
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "confeti" / "check" / f"{digest}.json"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (POSIX flock) for the block; a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock (one process at a time is the user's job there)
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != CACHE_VERSION:
        return {}
    return data.get("pairs", {})


def _write_cache(path: Path, pairs: dict) -> None:
    """Atomically: a temporary file in the same folder, then ``os.replace``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "pairs": pairs}, f)
        os.replace(tmp, path)
    except OSError:  # nowhere to write: verification still happened, only the cache is lost
        pass


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _workers(pending: int, workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    if pending < PARALLEL_FROM:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8))  # fmt: skip


def verify(dataset: _SegDataset, name: str | None = None, progress: bool = True,
           workers: int | None = None) -> CheckReport:  # fmt: skip
    """Decode every pair of ``dataset`` (cached per file); a report, bad files listed."""
    root = dataset.root
    name = name or (f"{root.name}/{dataset.split}" if dataset.SPLITS else root.name)
    report = CheckReport(name=name, root=root, pairs=len(dataset.pairs))
    cache_file = _cache_path(root)
    reader = type(dataset)
    with _exclusive(cache_file.with_name(cache_file.name + ".lock")):
        cache = _read_cache(cache_file)
        pending, stamps = [], {}
        for img, lab in dataset.pairs:
            key = str(lab.relative_to(root))
            stamps[key] = _stamp(img) + _stamp(lab)
            hit = cache.get(key)
            if hit is not None and hit[:4] == stamps[key]:
                report.from_cache += 1
                report.files_with_class.update(hit[4])
            else:
                pending.append((key, img, lab))
        n_workers = _workers(len(pending), workers)
        jobs = [(reader, img, lab) for _, img, lab in pending]
        bar = tqdm(total=len(jobs), desc=f"verifying {name}", unit="pair",
                   disable=not progress or not jobs, leave=False, file=sys.stderr)  # fmt: skip
        if n_workers > 1:
            ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                results = []
                for r in pool.map(_verify_job, jobs, chunksize=16):
                    results.append(r)
                    bar.update(1)
        else:
            results = []
            for job in jobs:
                results.append(_verify_job(job))
                bar.update(1)
        bar.close()
        for (key, _, _), (problems, classes) in zip(pending, results):
            report.verified_now += 1
            if problems:
                report.bad.extend(problems)
            else:
                cache[key] = stamps[key] + [classes]
                report.files_with_class.update(classes)
        if pending:
            _write_cache(cache_file, cache)
    return report


def raise_if_bad(reports: list[CheckReport], limit: int = 50) -> None:
    """A DatasetError naming every bad file (the first ``limit``) and what is wrong with it."""
    bad = [(r.name, path, why) for r in reports for path, why in r.bad]
    if not bad:
        return
    lines = [f"{len(bad)} damaged dataset file(s) found; nothing was trained:"]
    lines += [f"  {path}: {why}" for _, path, why in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more (python -m confeti data check --data DIR lists them all)")  # fmt: skip
    lines.append("Replace or remove these files, then run again (verified files are cached).")
    raise DatasetError("\n".join(lines))


def check_folder(data: str | Path, progress: bool = True) -> list[CheckReport]:
    """Verify every dataset found under ``data`` (gta5/, synthia/, cityscapes/{train,val}/)."""
    from .datasets import CityscapesDataset, GTA5Dataset, SynthiaDataset

    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"--data {data} is not a folder")
    found = []
    if (data / "gta5").exists():
        found.append(("gta5", GTA5Dataset(data / "gta5", check=False)))
    if (data / "synthia").exists():
        found.append(("synthia", SynthiaDataset(data / "synthia", check=False)))
    if (data / "cityscapes").exists():
        for split in ("train", "val"):
            if (data / "cityscapes" / "leftImg8bit" / split).exists():
                ds = CityscapesDataset(data / "cityscapes", split=split, check=False)
                found.append((f"cityscapes/{split}", ds))
    if not found:
        raise DatasetError(
            f"--data {data}: no gta5/, synthia/ or cityscapes/ folder inside (see docs/datasets.md)"
        )
    return [verify(ds, name=name, progress=progress) for name, ds in found]
