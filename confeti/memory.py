"""``python -m confeti bench --memory``: the memory of one training iteration, without a GPU.

``trace_step`` runs ``train_step`` under ``LiveBytes``, a ``TorchDispatchMode`` that sees every
tensor an operator returns and keeps, per storage, its size until the storage is really freed:
a ``weakref.finalize`` on ``t.untyped_storage()`` (torch >= 2 preserves a storage's Python object
for as long as its C++ storage lives, so the finaliser fires when the memory goes back to the
allocator, also when only the autograd graph held it; tests/test_memory.py checks this).
Storages alive before the step (parameters, gradients left by the previous step, buffers,
optimizer states, the batch) are "static"; ``state.clock`` (``train._mark``) closes each phase of
the iteration, and the peak of live bytes within it becomes that phase's peak.

What it measures is what a device allocator is asked for by tensors, op by op, the same on CPU
and GPU for the same ops and dtypes. Not seen: memory a kernel allocates for itself and frees
before returning (oneDNN scratchpads on CPU, the cuDNN workspace on GPU), the CUDA context, and
the caching allocator's rounding and fragmentation; ``GPU_ASSUMPTIONS`` states what those add.
tests/test_memory.py compares the traced peak with the CPU allocator's own events
(``torch.profiler`` with ``profile_memory=True``), which do see kernel scratch memory.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import Config

MB = 2**20

# What a CUDA device adds on top of the traced peak: stated assumptions, not measurements (the
# GPU check, ``python -m confeti gpu-check``, measures them). Used by ``fits`` below.
GPU_ASSUMPTIONS = {
    "cuda_context_mb": (
        400,
        "CUDA context + cuBLAS/cuDNN kernels with lazy module loading (CUDA >= 11.7): "
        "300-600 MB outside PyTorch's allocator, on the card but not in max_memory_allocated",
    ),
    "cudnn_workspace_mb": (
        256,
        "cudnn.benchmark picks the fastest algorithm that fits; its workspace is a transient "
        "allocation inside a convolution (tens to a few hundred MB at 512x512, batch 2)",
    ),
    "allocator_overhead": (
        0.15,
        "caching allocator: sizes rounded up to 512 B, blocks > 1 MB carved from 2 MB / 20 MB "
        "segments, fragmentation: reserved memory typically 5-25% above the allocated peak",
    ),
}


def gpu_total_mb(peak_mb: float) -> float:
    """The card memory a traced peak needs under ``GPU_ASSUMPTIONS`` (an estimate)."""
    a = {k: v[0] for k, v in GPU_ASSUMPTIONS.items()}
    return peak_mb * (1 + a["allocator_overhead"]) + a["cudnn_workspace_mb"] + a["cuda_context_mb"]


class LiveBytes(TorchDispatchMode):
    """Live bytes of every storage an operator returned, and their peaks (total and per phase).

    ``add_static(tensors, kind)`` registers storages that exist before the traced code (counted,
    freed like the others); ``ignore_existing()`` marks every other tensor storage the garbage
    collector knows as not new (an in-place op returning it allocates nothing). Use as a context
    manager around the traced code; ``mark(phase)`` closes a phase.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.phase_peak = 0
        self.per_phase: dict[str, int] = {}
        self.static: dict[str, int] = {}
        self.allocs = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> nbytes, while it lives
        self._fins: dict[int, weakref.finalize] = {}
        self._existing: set[int] = set()

    # ---- bookkeeping ----------------------------------------------------------------------
    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._fins.pop(key, None)

    def _forget(self, key: int) -> None:
        self._existing.discard(key)
        self._fins.pop(key, None)

    def _track(self, storage, nbytes: int) -> None:
        key = id(storage)
        self._sizes[key] = nbytes
        self._fins[key] = weakref.finalize(storage, self._free, key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.phase_peak = max(self.phase_peak, self.live)

    def _record(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage
            return
        key, n = id(s), s.nbytes()
        if key in self._existing:
            return
        old = self._sizes.get(key)
        if old is None:
            if n > 0:
                self.allocs += 1
                self._track(s, n)
        elif old != n:  # resize_ (an out= argument grown by the op)
            self._sizes[key] = n
            self.live += n - old
            self.peak = max(self.peak, self.live)
            self.phase_peak = max(self.phase_peak, self.live)

    def add_static(self, tensors, kind: str) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            if id(s) in self._sizes or s.nbytes() == 0:
                continue
            self._existing.discard(id(s))
            self.static[kind] = self.static.get(kind, 0) + s.nbytes()
            self._track(s, s.nbytes())

    def ignore_existing(self) -> None:
        """Every tensor storage alive now and not registered: returned by an op, it is not new."""
        with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
            warnings.simplefilter("ignore")
            objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        for obj in objs:
            try:
                if obj.device.type == "meta":
                    continue
                s = obj.untyped_storage()
            except Exception:  # sparse, nested, fake or otherwise storage-less tensors
                continue
            key = id(s)
            if key not in self._sizes and key not in self._existing:
                self._existing.add(key)
                self._fins[key] = weakref.finalize(s, self._forget, key)

    def mark(self, phase: str) -> None:
        """Close ``phase``: its peak is the most bytes live since the previous mark."""
        self.per_phase[phase] = max(self.per_phase.get(phase, 0), self.phase_peak)
        self.phase_peak = self.live

    def close(self) -> None:
        """Detach every finaliser (the tracked storages may outlive this object)."""
        for fin in list(self._fins.values()):
            fin.detach()
        self._fins.clear()

    # ---- the mode ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._record(t)
        return out


def static_tensors(state, batch: dict) -> dict[str, list[torch.Tensor]]:
    """The tensors a run holds between iterations, by kind: weights (student, teacher, adapter,
    G/D/F, the frozen ImageNet copy), gradients left by the previous iteration (G/D/F keep theirs
    until their next step), buffers (BatchNorm statistics, prototypes), optimizer states, batch."""
    modules = [state, *state._imnet]
    params = [p for m in modules for p in m.parameters()]
    optims = [state.optimizer]
    if state.style is not None:
        optims += list(state.style.optimizers.values())
    opt_states = [v for o in optims for s in o.state.values() for v in s.values()]
    scaler = getattr(state, "scaler", None)
    if scaler is not None:  # fp16: the loss scale and its growth tracker
        opt_states += list(vars(scaler).values())
    return {
        "weights": params,
        "gradients": [p.grad for p in params if p.grad is not None],
        "buffers": [b for m in modules for b in m.buffers()],
        "optimizer": [v for v in opt_states if isinstance(v, torch.Tensor)],
        "batch": list(batch.values()),
    }


def late_iteration(cfg: Config) -> int:
    """The first iteration past every warm-up gate (every loss of every method runs)."""
    return max(cfg.contrast_start, cfg.proto_warmup_iters, cfg.cam_mix_start, cfg.mix_start) + 1


def precision(state, cfg: Config, device: torch.device, dtype: str | None):
    """Device settings (``setup_device`` without its own autocast choice) and the autocast
    context for ``dtype``: None (fp32), "bf16", or "fp16" (with a GradScaler on ``state``)."""
    from .train import setup_device

    setup_device(state, dataclasses.replace(cfg, amp=False), device)
    if dtype is None or dtype == "fp32":
        return None
    if dtype not in ("bf16", "fp16"):
        raise ValueError(f"dtype must be None, 'fp32', 'bf16' or 'fp16', got {dtype!r}")
    low = torch.bfloat16 if dtype == "bf16" else torch.float16
    if low == torch.float16:
        state.scaler = torch.amp.GradScaler(device.type)
    return torch.autocast(device.type, dtype=low)


def build_state(cfg: Config, method: str, device, dtype: str | None = None, imnet_copy=None):
    """(TrainState, autocast) as a run builds them (seeded), in ``dtype`` (see ``precision``).

    ``imnet_copy``: hold the frozen ImageNet copy of the feature distance as a run with
    ``pretrained="imagenet"`` does (random weights here: nothing is downloaded); default: when
    ``cfg.fd_weight > 0``, so a ``pretrained=None`` config still costs what the paper run costs.
    """
    import copy

    from .train import TrainState

    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    state = TrainState(cfg, method, device)
    if imnet_copy is None:
        imnet_copy = cfg.fd_weight > 0
    if imnet_copy and state.imnet is None:
        state._imnet.append(copy.deepcopy(state.student).eval().requires_grad_(False))
    return state, precision(state, cfg, device, dtype)


def _mb(n: float) -> float:
    return round(n / MB, 1)


def trace_step(
    cfg: Config,
    method: str = "confeti",
    device="cpu",
    dtype: str | None = None,
    steps: int = 2,
    warmup_crop: tuple[int, int] | None = (128, 128),
    imnet_copy: bool | None = None,
    profile: bool = False,
) -> dict:
    """Peak memory of one ``train_step`` at ``cfg``'s crop and batch, after ``steps - 1`` warm-up
    steps (optimizer states, prototypes and the G/D/F gradients exist, as in a running job).

    The traced step runs at a late iteration (every gate passed: every loss is active).
    ``warmup_crop``: the warm-up steps run on crops at most this large (what they leave behind,
    optimizer states and prototypes, does not depend on the crop; None: ``cfg.crop_size``).
    ``imnet_copy``: see ``build_state``. ``profile``: also record the step with ``torch.profiler``
    (``profile_memory=True``) and return the allocator's own peaks under ``"profiler"``.

    Returns megabytes (2**20 bytes): ``static_mb`` (and ``static_by_kind``), ``peak_mb``,
    ``per_phase`` {phase: peak_mb}, ``peak_phase``, ``end_mb``, and what was traced.
    """
    from .bench import synthetic_batch
    from .runner import to_device
    from .train import train_step

    device = torch.device(device)
    prof = None
    if profile:  # from before the first allocation: every later free has a known size
        prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        prof.start()
    try:
        state, amp = build_state(cfg, method, device, dtype, imnet_copy)
        t0 = late_iteration(cfg)
        crop = cfg.crop_size
        if warmup_crop is not None:
            crop = (min(crop[0], warmup_crop[0]), min(crop[1], warmup_crop[1]))
        small = dataclasses.replace(cfg, crop_size=crop)
        warm = to_device(synthetic_batch(small, device, seed=1), device, cfg.channels_last)
        tic = time.perf_counter()
        for i in range(steps - 1):
            train_step(state, warm, t0 + i, amp=amp)
        warm_sec = time.perf_counter() - tic
        del warm
        batch = to_device(synthetic_batch(cfg, device), device, cfg.channels_last)
        gc.collect()

        mode = LiveBytes()
        for kind, tensors in static_tensors(state, batch).items():
            mode.add_static(tensors, kind)
        static = mode.live
        mode.ignore_existing()

        def clock(phase: str) -> None:
            mode.mark(phase)
            if prof is not None:
                with torch.profiler.record_function(_PHASE + phase):
                    pass

        state.clock = clock
        tic = time.perf_counter()
        if prof is not None:
            clock("<start>")
        try:
            with mode:
                logs = train_step(state, batch, t0 + steps - 1, amp=amp)
        finally:
            state.clock = None
            mode.close()
    finally:
        if prof is not None:
            prof.stop()
    mode.per_phase.pop("<start>", None)
    sec = time.perf_counter() - tic
    per_phase = {k: _mb(v) for k, v in mode.per_phase.items()}
    res = {
        "preset": cfg.preset,
        "method": method,
        "device": str(device),
        "dtype": dtype or "fp32",
        "crop_size": list(cfg.crop_size),
        "batch_size": cfg.batch_size,
        "backbone": cfg.backbone,
        "imnet_copy": bool(state.imnet is not None),
        "iteration": t0 + steps - 1,
        "losses": sorted(logs),
        "static_mb": _mb(static),
        "static_bytes": static,
        "static_by_kind": {k: _mb(v) for k, v in mode.static.items()},
        "peak_mb": _mb(mode.peak),
        "peak_bytes": mode.peak,
        "dynamic_peak_mb": _mb(mode.peak - static),
        "per_phase": per_phase,
        "peak_phase": max(mode.per_phase, key=mode.per_phase.get),
        "end_mb": _mb(mode.live),
        "allocations": mode.allocs,
        "warmup_sec": round(warm_sec, 1),
        "traced_sec": round(sec, 1),
    }
    if prof is not None:
        res["profiler"] = profiler_peaks(prof)
    return res


_PHASE = "confeti_phase::"


def profiler_peaks(prof) -> dict:
    """Peaks from the CPU allocator's own events in a ``torch.profiler`` recording
    (``profile_memory=True``) that began before the state was built: the running sum of
    allocated minus freed bytes, in time order. The traced step begins at
    ``record_function("confeti_phase::<start>")``, its phases end at ``confeti_phase::X``."""
    events = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if name == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU:
            events.append((e.start_ns(), 0, e.nbytes(), None))
        elif name.startswith(_PHASE):
            events.append((e.start_ns(), 1, 0, name[len(_PHASE) :]))
    events.sort(key=lambda ev: (ev[0], ev[1]))
    live = peak = phase_peak = start = 0
    per_phase: dict[str, int] = {}
    started = False
    for _, _, nbytes, phase in events:
        if phase is not None:
            if phase == "<start>":
                started, start, peak = True, live, live
            else:
                per_phase[phase] = max(per_phase.get(phase, 0), phase_peak)
            phase_peak = live
            continue
        live += nbytes
        peak, phase_peak = max(peak, live), max(phase_peak, live)
    if not started:
        raise ValueError("the recording holds no confeti_phase::<start> marker")
    return {
        "static_mb": _mb(start),
        "static_bytes": start,
        "peak_mb": _mb(peak),
        "peak_bytes": peak,
        "dynamic_peak_mb": _mb(peak - start),
        "per_phase": {k: _mb(v) for k, v in per_phase.items()},
        "end_mb": _mb(live),
        "events": sum(1 for e in events if e[3] is None),
    }


CARD_11GB_MB = 11019  # an RTX 2080 Ti as nvidia-smi reports it (a GTX 1080 Ti: 11178 MiB)


def fits(res: dict, card_mb: float = CARD_11GB_MB) -> dict:
    """Whether the traced step fits a card of ``card_mb`` MiB under ``GPU_ASSUMPTIONS``."""
    need = gpu_total_mb(res["peak_mb"])
    return {
        "card_mb": card_mb,
        "estimated_card_mb": round(need, 1),
        "fits": need <= card_mb,
        "margin_mb": round(card_mb - need, 1),
        "assumptions": {k: v[0] for k, v in GPU_ASSUMPTIONS.items()},
    }


def memory_report(cfg: Config, methods=None, device=None, dtype: str | None = None) -> dict:
    """``bench --memory``: ``trace_step`` for each method (default: confeti) and whether it fits
    an 11 GB card under ``GPU_ASSUMPTIONS``; megabytes are MiB. An estimate, not a GPU run."""
    res = {
        "estimate": "LiveBytes trace of one train_step (confeti/memory.py), not a GPU measurement",
        "torch": torch.__version__,
        "gpu_assumptions": {k: {"value": v[0], "why": v[1]} for k, v in GPU_ASSUMPTIONS.items()},
        "methods": {},
    }
    for m in methods or ["confeti"]:
        r = trace_step(cfg, m, device=device or "cpu", dtype=dtype)
        r["fits_11gb"] = fits(r)
        res["methods"][m] = r
    return res
