"""Measurement primitives: CPU-time timers, training steps, tensor-memory peaks, sizes on disk.

Times are *process CPU time* (``time.process_time``) with ``torch.set_num_threads(1)``: on shared cores wall time
also counts the time other processes hold the core, CPU time does not. Wall time is recorded alongside.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .models import ModelSpec, forward_only


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call of ``fn``, with Python's cyclic GC paused meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        if enabled:
            gc.enable()


def settle() -> None:
    """Collect garbage, then freeze the survivors so later collections (and GC pauses) only see new objects."""
    gc.collect()
    gc.freeze()


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1, setup: Callable[[], Any] | None = None) -> dict:
    """Median CPU and wall time of ``repeats`` calls after ``warmup`` untimed ones (``setup`` runs untimed)."""
    cpu, wall = [], []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        c, w = timed(fn)
        if i >= warmup:
            cpu.append(c)
            wall.append(w)
    return {"cpu_s": median(cpu), "wall_s": median(wall), "cpu_all_s": cpu}


class Trainer:
    """One method's model, batch and AdamW optimizer; ``step()`` = forward + backward + optimizer step."""

    def __init__(self, name: str, model: nn.Module, spec: ModelSpec, batch: dict[str, Any], lr: float = 1e-4):
        self.name, self.model, self.spec, self.batch = name, model, spec, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr) if self.params else None
        model.train()

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss = self.spec.loss_fn(self.model, self.batch)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()

    def clear_grads(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def optimizer_state_bytes(self) -> int:
        """Bytes of every tensor in the AdamW state (exp_avg, exp_avg_sq, step) after at least one step."""
        if self.optimizer is None:
            return 0
        return tensor_bytes(
            value for state in self.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        )

    def persistent_bytes(self) -> int:
        """Live bytes between steps: all parameters (frozen too), buffers, gradients and optimizer state."""
        tensors: list[torch.Tensor] = [*self.model.parameters(), *self.model.buffers()]
        tensors += [p.grad for p in self.params if p.grad is not None]
        if self.optimizer is not None:
            tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return tensor_bytes(tensors)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def train_step_times(trainers: list[Trainer], warmup: int, steps: int) -> dict[str, dict]:
    """Step times of every trainer, measured in interleaved rounds (one step of each method per round), so slow
    drifts of a shared machine's load hit every method alike. Medians over ``steps`` rounds after ``warmup``."""
    for _ in range(warmup):
        for trainer in trainers:
            trainer.step()
    cpu: dict[str, list[float]] = {t.name: [] for t in trainers}
    wall: dict[str, list[float]] = {t.name: [] for t in trainers}
    for _ in range(steps):
        for trainer in trainers:
            c, w = timed(trainer.step)
            cpu[trainer.name].append(c)
            wall[trainer.name].append(w)
    return {
        t.name: {"cpu_s": median(cpu[t.name]), "wall_s": median(wall[t.name]), "cpu_all_s": cpu[t.name]}
        for t in trainers
    }


def allocation_peak(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator while ``fn`` runs, from the profiler's
    memory events. Frees of tensors allocated before ``fn`` are not reported by the profiler, so this is an upper
    bound of the increase over the live bytes at the start."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if str(event.device_type()).endswith("CPU"):
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def training_memory(trainer: Trainer) -> dict[str, int]:
    """Peak training memory = live tensor bytes before a step (weights, buffers, optimizer state; gradients are
    freed by ``zero_grad``) + the profiled allocation peak during one full step (activations, saved tensors,
    gradients, kernel transients, optimizer temporaries)."""
    trainer.clear_grads()
    persistent = trainer.persistent_bytes()
    step_peak = allocation_peak(trainer.step)
    trainer.clear_grads()
    return {"persistent_bytes": persistent, "step_peak_bytes": step_peak, "peak_memory_bytes": persistent + step_peak}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def checkpoint_bytes(model: nn.Module, full: bool) -> dict[str, int]:
    """Bytes on disk of ``save_pretrained`` (whole adapter directory and its weights file); full fine-tuning: the
    model's state dict saved with safetensors."""
    with tempfile.TemporaryDirectory() as tmp:
        if full:
            from safetensors.torch import save_model

            path = Path(tmp) / "model.safetensors"
            save_model(model, str(path))
            size = path.stat().st_size
            return {"checkpoint_bytes": size, "checkpoint_weights_bytes": size}
        model.save_pretrained(tmp)
        weights = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
        return {"checkpoint_bytes": dir_bytes(Path(tmp)), "checkpoint_weights_bytes": weights}


def merge_and_unload_time(model: nn.Module, repeats: int) -> dict:
    """``merge_and_unload()`` on fresh deep copies (the copy is untimed)."""
    holder: dict[str, nn.Module] = {}

    def setup() -> None:
        holder.clear()
        holder["m"] = copy.deepcopy(model)

    def run() -> None:
        holder["m"].merge_and_unload()

    result = repeat(run, repeats, warmup=0, setup=setup)
    holder.clear()
    return result


def swap_times(model: nn.Module, spec: ModelSpec, repeats: int, merged: bool = True) -> dict:
    """Expert swap on a PEFT model holding experts ``e0`` and ``e1``.

    ``swap``: ``set_adapter`` to the other expert + one forward of a single short request. ``forward``: the same
    forward without the swap. ``swap_merged``: the deployment where the active expert is merged into the base
    weights: ``unmerge_adapter`` + ``set_adapter`` + ``merge_adapter`` (no forward; it then runs at base speed).
    """
    request = spec.batch(seed=7, batch_size=1, seq_len=spec.swap_seq_len)
    request.pop("target", None)
    model.eval()
    state = {"active": "e0"}

    def flip() -> str:
        state["active"] = "e1" if state["active"] == "e0" else "e0"
        return state["active"]

    with torch.no_grad():
        forward = repeat(lambda: forward_only(model, request), repeats, warmup=2)
        swap = repeat(lambda: (model.set_adapter(flip()), forward_only(model, request)), repeats, warmup=2)
        result = {"swap": swap, "forward": forward}
        if merged:
            tuner = model.base_model
            tuner.merge_adapter()

            def swap_merged() -> None:
                tuner.unmerge_adapter()
                model.set_adapter(flip())
                tuner.merge_adapter()

            result["swap_merged"] = repeat(swap_merged, repeats, warmup=2)
            tuner.unmerge_adapter()
    return result


def full_swap_times(model: nn.Module, spec: ModelSpec, repeats: int) -> dict:
    """Full fine-tuning's "swap": ``load_state_dict`` of another fine-tuned copy + one forward of the request."""
    request = spec.batch(seed=7, batch_size=1, seq_len=spec.swap_seq_len)
    request.pop("target", None)
    model.eval()
    experts = [{k: v.detach().clone() for k, v in model.state_dict().items()} for _ in range(2)]
    for i, expert in enumerate(experts):
        for value in expert.values():
            if value.is_floating_point():
                value.add_(0.001 * (i + 1))
    state = {"i": 0}

    def swap() -> None:
        state["i"] ^= 1
        model.load_state_dict(experts[state["i"]])
        forward_only(model, request)

    with torch.no_grad():
        forward = repeat(lambda: forward_only(model, request), repeats, warmup=2)
        result = {"swap": repeat(swap, repeats, warmup=2), "forward": forward}
    model.train()
    return result


def git_revision() -> str:
    """``HEAD`` commit of the work tree (``+dirty`` when peft_sparse/ has uncommitted changes), or ``unknown``."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "peft_sparse"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    import peft
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
