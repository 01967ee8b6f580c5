"""The training loop around ``train_step``: data, phases, checkpoints, logging, evaluation.

Taught in notebooks/04_joint_training.ipynb. Guarantees (tested in tests/test_runner.py and
tests/test_reliability.py):

- Every random draw of iteration t (which images, crops, flips, ClassMix classes, augmentation,
  sampled pixels and patches) is a function of (seed, rank, t): a run resumed from a checkpoint
  at iteration t continues bit-for-bit on CPU.
- ``checkpoint.pt`` is written atomically every ``ckpt_every`` iterations, on Ctrl-C and at the
  end; a NaN/Inf loss stops the run, naming the loss and iteration, without overwriting it.
- Ctrl-C (SIGINT) or SIGTERM during training finishes the iteration under way, saves the
  checkpoint and exits with 130 (SIGTERM: 143); a second Ctrl-C stops at once and leaves the
  previous checkpoint, never half of one. Ctrl-C during the final evaluation writes no
  ``eval.json`` (the run never reports success after an interrupt); ``--resume`` evaluates.
- Every image and label is decoded once before the first iteration (``datacheck.verify``,
  cached); a file that still fails to decode mid-run stops the run with its name, after saving
  the checkpoint of the last finished iteration, so ``--resume`` works once the file is fixed.
- ``CONFETI_PAUSE_AT=N`` (or ``ckpt:N``) makes the process sleep after iteration N (or inside
  the checkpoint write of iteration N) after creating ``OUT/.paused``: fault-injection tests
  kill it there, at a point they choose, instead of after a guessed delay.
- Phases of one run: (0) standalone CUT pre-training for ``style_pretrain_iters``; (1) the method
  for ``iters``; (2) for ``schedule="two_stage"`` CONFETI, the segmentor is re-initialised and trained
  for ``iters`` more with G frozen (the official code's second stage).
- Multi-GPU through ``torchrun``: each rank draws its own batches, gradients are averaged with
  all-reduce before every optimizer step, prototypes are synchronised inside their update, and
  rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, load_state_checked, save_atomic
from .config import Config
from .cutcache import Phase0Cache
from .datacheck import raise_if_bad, verify
from .datasets import (
    CityscapesDataset,
    DatasetError,
    GTA5Dataset,
    RareClassSampler,
    SynthiaDataset,
)
from .metrics import evaluate, format_table, summarize
from .train import TrainState, check_finite, parts_of, setup_device, train_step

CKPT = "checkpoint.pt"


class RunError(RuntimeError):
    """A run that cannot start: bad options, an occupied output folder."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopRequest:
    """SIGINT/SIGTERM while ``deferring``: remember it and let the iteration finish.

    Outside ``deferring`` (setup, data check, final evaluation) and on a second signal, the
    signal raises ``KeyboardInterrupt`` at once, as Python's default handler does. A no-op when
    not called from the main thread (signal handlers can only be set there); a signal that the
    process ignores (``nohup ... &`` ignores SIGINT) stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.deferring = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.deferring and self.signum is None:
            self.signum = signum
            return
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # nohup &: stay ignored
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False

    def agreed(self, world: int, device) -> int | None:
        """The signal to stop on, the same on every rank (any rank's signal stops all)."""
        if world == 1:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def _pause_if_asked(where: str, t: int, out: Path) -> None:
    """Fault-injection hook: ``CONFETI_PAUSE_AT=N`` / ``ckpt:N`` sleeps here until killed."""
    want = os.environ.get("CONFETI_PAUSE_AT")
    if not want:
        return
    kind, _, n = want.rpartition(":")
    if (kind or "iter") == where and int(n) == t:
        (out / ".paused").write_text(f"{where}:{t}\n")
        while True:
            time.sleep(3600)


# ---- devices and distributed ------------------------------------------------------------------
def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's environment; gloo on CPU, nccl on GPU (one GPU
    per process: cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:  # also --device cuda:1 alone: the
        torch.cuda.set_device(device)  # bf16 check, pinned memory, peak memory refer to it
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def _through_one_buffer(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective`` on one flat copy of ``tensors`` and copy the result back into them."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _average(tensors: list[torch.Tensor]) -> None:
    """All-reduce a list of tensors through one flat buffer and divide by the world size."""

    def mean(flat):
        dist.all_reduce(flat)
        flat /= dist.get_world_size()

    _through_one_buffer(tensors, mean)


def average_gradients(module: torch.nn.Module) -> None:
    """What DDP does, for a step with several backward passes: average the gradients over ranks,
    then give every rank rank 0's BatchNorm statistics (DDP's ``broadcast_buffers``), all of
    them in one flat broadcast instead of one call per buffer."""
    _average([p.grad for p in module.parameters() if p.grad is not None])
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    _through_one_buffer(bufs, lambda flat: dist.broadcast(flat, 0))


def rank_checksums(state) -> list[list[float]]:
    """[sum of student weights, sum of prototypes] of every rank (they must agree)."""
    mine = torch.tensor(
        [
            sum(float(p.double().sum()) for p in state.student.parameters()),
            float(state.protos.protos.double().sum()),
        ],
        dtype=torch.float64,
        device=state.protos.protos.device,  # NCCL gathers device tensors only
    )
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [o.tolist() for o in out]


# ---- data ---------------------------------------------------------------------------------
class _Seeded(Dataset):
    """Calls ``base[i]`` after seeding torch's RNG, so crops/flips depend only on the seed."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key
        _seed_step(seed, _CPU)  # the transforms draw on the CPU generator only
        return self.base[index]


_CPU = torch.device("cpu")


def _seed_step(seed: int, device: torch.device) -> None:
    """torch.manual_seed(seed), without the CUDA/XPU/MTIA seeds a CPU run never uses (each
    one queued with a captured stack trace while that backend is not initialised: 1.4 ms)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x632BE59BD9B9E5)) * 0xBF58476D1CE4E5B9 % (1 << 63)
    return h


@dataclass
class Data:
    source: Dataset
    target: Dataset
    val: Dataset
    rcs: RareClassSampler | None


def build_data(
    cfg: Config, root: str | Path, method: str, data_check: bool = True, progress: bool = True
) -> Data:
    """Source (GTA5 or SYNTHIA layout), target train and target val under ``root``.

    ``data_check``: decode every image and label first (``datacheck.verify``, cached per file)
    and refuse the folder, naming every damaged file; otherwise only the file headers are read.
    """
    root = Path(root)
    if not root.is_dir():
        raise RunError(
            f"--data {root} is not a folder (expected {root}/gta5 and {root}/cityscapes)"
        )
    kw = dict(crop_size=cfg.crop_size, flip=True, cat_max_ratio=cfg.cat_max_ratio, check=False,
              cache=True)  # fmt: skip
    src_cls = {"gta5": GTA5Dataset, "synthia": SynthiaDataset}[cfg.source]
    source = src_cls(root / cfg.source, resize=cfg.source_resize, **kw)
    target = CityscapesDataset(root / "cityscapes", split="train", resize=cfg.target_resize, **kw)
    val = CityscapesDataset(root / "cityscapes", split="val", resize=None, crop_size=None, check=False)  # fmt: skip
    if data_check:
        raise_if_bad([verify(ds, progress=progress) for ds in (source, target, val)])
    else:
        for ds in (source, target, val):
            ds.check(progress=progress)
    for name, ds in (("source", source), ("target", target)):
        h, w = ds.image_size(0)
        if cfg.crop_size[0] > h or cfg.crop_size[1] > w:
            raise RunError(f"crop_size {cfg.crop_size} is larger than the {name} images ({h}x{w})")
    rcs = None
    if cfg.rcs and not parts_of(method).oracle:
        # the class statistics decode every source label once: rank 0 computes and writes
        # them (atomically), the other ranks read its file after the barrier
        ddp = dist.is_available() and dist.is_initialized()
        if ddp and dist.get_rank() > 0:
            dist.barrier()
        rcs = RareClassSampler(
            source,
            temperature=cfg.rcs_temperature,
            min_pixels=cfg.rcs_min_pixels,
            num_classes=cfg.num_classes,
        )
        if ddp and dist.get_rank() == 0:
            dist.barrier()
    return Data(source, target, val, rcs)


class BatchStream:
    """Batches for iterations start..stop-1; batch t is a function of (seed, rank, t) only."""

    def __init__(self, data: Data, cfg: Config, start: int, stop: int, rank: int, oracle: bool):
        self.data, self.cfg, self.rank, self.oracle = data, cfg, rank, oracle
        self.keys = range(start, stop)
        loader_kw = dict(num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available())
        if cfg.num_workers > 0:
            loader_kw["persistent_workers"] = False
        self.src = DataLoader(_Seeded(data.source), batch_sampler=self._keys("s"), **loader_kw)
        self.tgt = DataLoader(_Seeded(data.target), batch_sampler=self._keys("t"), **loader_kw)

    def _keys(self, domain: str):
        cfg, n = self.cfg, len(self.data.source if domain == "s" else self.data.target)
        stream = self

        class _Sampler:
            def __len__(self):
                return len(stream.keys)

            def __iter__(self):
                for t in stream.keys:
                    g = torch.Generator().manual_seed(
                        _mix_seed(cfg.seed, stream.rank, t, ord(domain))
                    )
                    if domain == "s" and stream.data.rcs is not None:
                        idx = [stream.data.rcs.sample(g) for _ in range(cfg.batch_size)]
                    else:
                        idx = torch.randint(n, (cfg.batch_size,), generator=g).tolist()
                    seeds = torch.randint(2**62, (cfg.batch_size,), generator=g).tolist()
                    yield list(zip(idx, seeds))

        return _Sampler()

    def __iter__(self):
        for (x_s, y_s), (x_t, y_t) in zip(self.src, self.tgt):
            yield {"x_s": x_s, "y_s": y_s, "x_t": x_t, "y_t": y_t}


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


# ---- evaluation -------------------------------------------------------------------------------
class _AtScale(torch.nn.Module):
    """Whole-image inference at the training scale; logits are upsampled to the label size."""

    def __init__(self, model, size):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x):
        if self.size is not None:
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear")
        return self.model(x)


def evaluate_model(model, dataset, cfg: Config, device, progress=True, max_images=None,
                   amp=None) -> dict:  # fmt: skip
    """mIoU of ``model`` on ``dataset`` at the training scale (``cfg.target_resize``).

    Under torchrun every rank evaluates its share of the images (image i on rank i mod N) and
    the confusion matrices are summed with one all-reduce: every rank returns the same numbers,
    and no rank idles near the NCCL watchdog while one evaluates alone. ``amp``: the training's
    autocast context (logits are upsampled and compared in fp32).
    """
    n = min(len(dataset), max_images or cfg.eval_max_images or len(dataset))
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    shard = torch.utils.data.Subset(dataset, range(rank, n, world))
    loader = DataLoader(shard, batch_size=1 if cfg.target_resize is None else 2,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")  # fmt: skip
    conf = evaluate(
        _AtScale(model, cfg.target_resize),
        loader,
        device,
        num_classes=cfg.num_classes,
        progress=progress and rank == 0,
        autocast=amp,
    )
    if ddp:
        total = conf.to(device)
        dist.all_reduce(total)
        conf = total.cpu()
    out = summarize(conf)
    out["images"] = int(n)
    return out


# ---- the run ----------------------------------------------------------------------------------
def phases(cfg: Config, method: str) -> list[tuple[str, int, int]]:
    """(name, start, stop) in global iterations."""
    p = parts_of(method)
    out, t = [], 0
    if p.style and cfg.style_pretrain_iters > 0:
        out.append(("style_pretrain", 0, cfg.style_pretrain_iters))
        t = cfg.style_pretrain_iters
    out.append(("train", t, t + cfg.iters))
    if method == "confeti" and cfg.schedule == "two_stage":
        out.append(("stage2", t + cfg.iters, t + 2 * cfg.iters))
    return out


def with_defaults(config: dict) -> dict:
    """A config.json's fields with the defaults of fields added since it was written (their
    defaults keep the old behaviour), as JSON values; unknown fields are kept as they are, so
    such a file never compares equal to a current config."""
    full = Config().to_dict()
    return json.loads(json.dumps({**{k: v for k, v in full.items() if k not in config}, **config}))


@contextlib.contextmanager
def run_lock(out: Path, enabled: bool = True):
    """Hold an exclusive lock on ``out/.lock`` while this process trains the run in ``out``.

    A second process started on the same folder (a second ablation, a notebook, a shell) is
    refused with a ``RunError`` instead of writing the same checkpoint and log as the first. The
    operating system drops the lock when the process ends, a crash or a kill included, so a
    stale lock never blocks a resume. Only rank 0 of a ``torchrun`` job takes it.
    """
    if not enabled:
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".lock", "a+")
    except OSError as e:
        raise RunError(f"cannot write to --out {out}: {e}") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip() or "a process"
            raise RunError(f"--out {out} is being trained by {who} right now; wait for it to "
                           "finish (or stop it) and resume, or choose another --out") from None  # fmt: skip
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield


def _prepare_out(out: Path, cfg: Config, method: str, resume: bool, overwrite: bool) -> None:
    meta = {"method": method, "config": cfg.to_dict()}
    cfg_file = out / "config.json"
    if cfg_file.exists() and not overwrite:
        if not resume:
            raise RunError(
                f"--out {out} already holds a run; pass --resume to continue it or --overwrite "
                "to replace it"
            )
        old = json.loads(cfg_file.read_text())
        old["config"] = with_defaults(old.get("config", {}))
        # compare through JSON, where tuples and lists are the same thing
        same = json.dumps(old, sort_keys=True) == json.dumps(meta, sort_keys=True)
        if not same:
            raise RunError(f"--resume: {cfg_file} was written for another method or config")
    if overwrite:
        for name in (CKPT, "metrics.jsonl", "eval.json", "summary.json"):
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, cfg_file)
    except OSError as e:
        raise RunError(f"cannot write to --out {out}: {e}") from e


def _checkpoint(state: TrainState, t: int, seconds: float | None = None) -> dict:
    ck = {
        "iteration": t,
        "seconds": seconds,  # training seconds of iterations 1..t over every call (None: unknown)
        "method": state.method,
        "model": state.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "train_style": state.train_style,
    }
    if state.style is not None:
        ck["style_optim"] = state.style.optim_state_dict()
    if getattr(state, "scaler", None) is not None:  # fp16: resume with the scale it had
        ck["scaler"] = state.scaler.state_dict()
    return ck


def _restore(state: TrainState, ck: dict) -> int:
    if ck.get("method") != state.method:
        raise RunError(f"checkpoint is of method {ck.get('method')!r}, not {state.method!r}")
    load_state_checked(state, ck["model"], "model")
    state.optimizer.load_state_dict(ck["optimizer"])
    state.train_style = ck.get("train_style", state.train_style)
    if state.style is not None and "style_optim" in ck:
        state.style.load_optim_state_dict(ck["style_optim"])
    if getattr(state, "scaler", None) is not None and "scaler" in ck:
        state.scaler.load_state_dict(ck["scaler"])
    return int(ck["iteration"])


def _start_stage2(state: TrainState, cfg: Config, device) -> None:
    """Second stage of the official schedule: new segmentor from the initial weights, G frozen."""
    torch.manual_seed(cfg.seed)  # the same initial weights as stage 1
    fresh = TrainState(cfg, state.method, device)
    setup_device(fresh, cfg, device)  # stage 1's memory format (its other settings are kept)
    for name in ("student", "teacher", "protos", "adapter"):
        setattr(state, name, getattr(fresh, name))
    state.optimizer = fresh.optimizer
    state.train_style = False
    state.style.requires_grad_(False)


def train(
    cfg: Config,
    method: str,
    data: str | Path,
    out: str | Path,
    *,
    resume=False,
    overwrite=False,
    device=None,
    progress=True,
    data_check=True,
    cut_cache=None,
) -> dict:
    """Train ``method`` with ``cfg`` on the folders under ``data``; write the run into ``out``.

    ``data_check=False`` skips the full decode of every file before training (headers only).
    ``cut_cache``: a folder where phase 0 (the standalone CUT pre-training) is stored by the
    first run of its seed, data and CUT settings and loaded by the next ones (``cutcache``):
    the same results, without training phase 0 again. Single-process runs only.
    """
    with StopRequest() as stop, run_lock(Path(out), int(os.environ.get("RANK", 0)) == 0):
        return _train(cfg, method, data, out, stop, resume=resume, overwrite=overwrite,
                      device=device, progress=progress, data_check=data_check,
                      cut_cache=cut_cache)  # fmt: skip


def _train(
    cfg, method, data, out, stop, *, resume, overwrite, device, progress, data_check, cut_cache
):
    cfg.validate()
    code_commit()  # the code this run starts with (cached for its summary)
    parts = parts_of(method)
    device = resolve_device(device)
    owns_group = not (dist.is_available() and dist.is_initialized())
    rank, world, device = init_distributed(device)
    owns_group = owns_group and world > 1  # we started it: we end it (no NCCL leak warning)
    out = Path(out)
    if rank == 0:
        _prepare_out(out, cfg, method, resume, overwrite)
    d = build_data(cfg, data, method, data_check=data_check, progress=progress and rank == 0)
    if parts.oracle and len(d.target) == 0:
        raise RunError("--method oracle needs labelled target images (cityscapes/gtFine/train)")
    torch.manual_seed(cfg.seed)
    state = TrainState(cfg, method, device)
    if world > 1:
        state.sync_grads = average_gradients
        if state.style is not None:
            state.style.sync_grads = _average  # before each G/D/F step, not in a step hook
    amp = setup_device(state, cfg, device)

    plan = phases(cfg, method)
    total = plan[-1][2]
    start, prior = 0, 0.0  # prior: training seconds of the calls before this one
    ck_path = out / CKPT
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path, map_location=device)
        start = _restore(state, ck)
        prior = ck.get("seconds", None if start else 0.0)  # a checkpoint without it: unknown
        del ck
    metrics_path = out / "metrics.jsonl"
    if rank == 0:  # drop log lines of iterations the checkpoint does not contain
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        kept = [ln for ln in lines if ln and json.loads(ln)["iter"] <= start]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))

    if rank == 0:
        for stale in out.glob(f".{CKPT}.*.tmp"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)
        if start < total:  # results of an earlier, unfinished or replaced run are not ours
            for name in ("eval.json", "summary.json"):
                (out / name).unlink(missing_ok=True)

    def save(t: int) -> None:
        if rank == 0:
            spent = None if prior is None else prior + time.time() - t0
            save_atomic(
                _checkpoint(state, t, spent),
                ck_path,
                before_replace=lambda: _pause_if_asked("ckpt", t, out),
            )

    def log_row(t: int, name: str, logs: dict) -> None:
        if rank == 0 and (t % cfg.log_every == 0 or t == total):
            row = {
                "iter": t,
                "phase": name,
                "lr": state.optimizer.param_groups[0]["lr"],
                **{k: round(v, 6) for k, v in logs.items()},
            }
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix({k: f"{v:.3f}" for k, v in list(logs.items())[:3]})

    def eval_row(t: int) -> None:
        if t % cfg.eval_every == 0 and t < total:  # every rank evaluates its share
            ev = evaluate_model(state.student, d.val, cfg, device, progress=False, amp=amp)
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"iter": t, "phase": "eval", "miou": ev["miou"]}) + "\n")

    cut, cut_status = None, None
    phase0_stop = plan[0][2] if plan[0][0] == "style_pretrain" else 0
    if cut_cache is not None and world == 1 and start < phase0_stop:
        cut = Phase0Cache(cut_cache, cfg, data, device)

    t0, t, saved = time.time(), start, start
    bar = tqdm(total=total, initial=start, desc=f"{method}", disable=not progress or rank > 0)
    stop.deferring = True
    try:
        if cut is not None:
            stop.deferring = False  # waiting for another run's phase 0: Ctrl-C stops at once
            cut.acquire()
            stop.deferring = True
            hit = cut.load()
            if hit is not None:  # phase 0 as this run would train it: load, replay its rows
                state.style.load_state_dict(hit["style"])
                state.style.load_optim_state_dict(hit["style_optim"])
                for i in range(t, cut.iters):
                    log_row(i + 1, "style_pretrain", hit["logs"][i])
                    eval_row(i + 1)
                bar.update(cut.iters - t)
                t = cut.iters
                save(t)
                saved, cut_status = t, "reused"
            if hit is not None or t > 0:  # resumed inside phase 0: nothing complete to store
                cut.release()
                cut = None
        for name, p_start, p_stop in plan:
            if t >= p_stop:
                continue
            if name == "stage2" and t == p_start:
                _start_stage2(state, cfg, device)
            stream = BatchStream(d, cfg, t, p_stop, rank, parts.oracle)
            for batch in stream:
                if (signum := stop.agreed(world, device)) is not None:
                    raise Interrupted(f"signal {signal.Signals(signum).name}", signum)
                _seed_step(_mix_seed(cfg.seed, rank, t, 7), device)
                batch = to_device(batch, device, cfg.channels_last)
                if name == "style_pretrain":
                    logs = {
                        k: float(v)
                        for k, v in state.style.pretrain_step(batch["x_s"], batch["x_t"]).items()
                    }
                else:
                    logs = train_step(state, batch, t - p_start, amp=amp)
                check_finite(logs, t)
                if cut is not None and name == "style_pretrain":
                    cut.logs.append(logs)
                t += 1
                bar.update(1)
                log_row(t, name, logs)
                if t % cfg.ckpt_every == 0 or t == total:
                    save(t)
                    saved = t
                eval_row(t)
                if rank == 0:
                    _pause_if_asked("iter", t, out)
            if cut is not None and name == "style_pretrain":  # phase 0 done: store it, unlock
                cut.store(state.style)
                cut.release()
                cut, cut_status = None, "stored"
        if (signum := stop.agreed(world, device)) is not None:  # a signal during the last one
            raise Interrupted(f"signal {signal.Signals(signum).name}", signum)
    except KeyboardInterrupt as e:
        stop.deferring = False
        if t > saved:  # a second Ctrl-C inside this write stops it; the old file stays whole
            save(t)
        if rank == 0:
            where = (
                f"checkpoint of iteration {t} in {ck_path}" if t > start else "no new checkpoint"
            )
            print(f"\ninterrupted at iteration {t}: {where}; rerun with --resume", file=sys.stderr)
        if isinstance(e, Interrupted):
            raise
        raise Interrupted("interrupted") from None
    except FloatingPointError as e:
        raise FloatingPointError(
            f"{e} (iteration {t}); the last good checkpoint {ck_path} was kept"
        ) from None
    except DatasetError as e:  # a file that changed on disk after the data check
        if t > saved:
            save(t)
        raise DatasetError(
            f"{e}\nwhile loading the batch of iteration {t + 1}: the checkpoint of iteration "
            f"{t} is in {ck_path}; fix or replace the file, then rerun with --resume"
        ) from None
    finally:
        stop.deferring = False
        bar.close()
        if cut is not None:
            cut.release()
    seconds = time.time() - t0
    checksums = rank_checksums(state) if world > 1 else None
    try:  # every rank evaluates its share; rank 0 writes
        result = evaluate_model(state.student, d.val, cfg, device, progress=progress, amp=amp)
    except KeyboardInterrupt:
        if rank == 0:
            print(
                f"\ninterrupted during the final evaluation: no eval.json written; the checkpoint "
                f"of iteration {t} in {ck_path} is complete, rerun with --resume to evaluate it",
                file=sys.stderr,
            )
        raise Interrupted("interrupted during the final evaluation") from None
    if rank == 0:
        result["split"] = "val"
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        summary = {
            "method": method,
            # the whole run's training time (every call, without evaluation); a run resumed from
            # a checkpoint that did not record it: this call's only, and seconds_complete false
            "seconds": round(seconds + (prior or 0.0), 1),
            "seconds_this_call": round(seconds, 1),
            "iters_run": t - start,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "commit": code_commit(),
            "torch": torch.__version__,
            "miou": result["miou"],
        }
        if prior is None:
            summary["seconds_complete"] = False
        if checksums is not None:
            summary["world_size"], summary["rank_checksums"] = world, checksums
        if cut_status is not None:
            summary["cut_pretrain"] = cut_status  # phase 0 reused from / stored in cut_cache
        if device.type == "cuda":
            summary["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if progress:
            print(format_table(result))
    if world > 1:
        dist.barrier()
        if owns_group:
            dist.destroy_process_group()
    return result


@functools.cache
def code_commit() -> str:
    """The git commit of the code that ran (``unknown`` outside a git checkout).

    Read once per process, at the start of a run (``train`` calls it first): a checkout moved
    while a long run trains does not change the commit the run reports.
    """
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=10)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_for_eval(ckpt: str | Path, device=None) -> tuple[TrainState, Config]:
    """The trained state and its config from ``RUN/checkpoint.pt`` (config.json beside it)."""
    ckpt = Path(ckpt)
    cfg_file = ckpt.parent / "config.json"
    if not cfg_file.exists():
        raise RunError(f"{cfg_file} not found next to the checkpoint {ckpt}")
    meta = json.loads(cfg_file.read_text())
    cfg = Config.from_dict(meta["config"])
    device = resolve_device(device)
    state = TrainState(cfg, meta["method"], device)
    _restore(state, load_checkpoint(ckpt, map_location=device))
    return state, cfg
