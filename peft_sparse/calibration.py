"""Data-driven mask selection: ``calibrate_masks`` and the Trainer callback that runs it before step 0.

Scores are accumulated by hooks on the sparse adapter layers: a forward hook keeps the layer input and a hook on
the output gradient adds ``gᵀx`` (the base weight's gradient, which autograd never computes because the base is
frozen) into one dense fp32 buffer per layer. ``mask_init="warmup"`` instead trains a transient dense delta for a
few Adam steps and keeps the entries with the largest ``|∂L/∂Δ ⊙ Δ|``; its extra memory (delta, gradient and two
Adam moments per targeted weight, fp32) is freed before the function returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from . import masks
from .layer import SparseAdapterLayer

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def tuner_root(model: nn.Module) -> nn.Module:
    """The module whose ``named_modules`` keys match ``entries_pattern`` (the base model inside the tuner)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    return model.model if isinstance(model, BaseTuner) else model


def _sparse_layers(root: nn.Module, adapter_name: str) -> dict[str, SparseAdapterLayer]:
    return {
        name: m
        for name, m in root.named_modules()
        if isinstance(m, SparseAdapterLayer) and adapter_name in m.sparse_adapter_values
    }


def _resolve_adapter(root: nn.Module, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    configs = getattr(root, "peft_config", {}) or {}
    sparse = [name for name, cfg in configs.items() if getattr(cfg, "peft_type", None) == "SPARSE_ADAPTER"]
    if len(sparse) != 1:
        raise ValueError(f"pass adapter_name: the model has sparse adapters {sparse}")
    return sparse[0]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: put `labels` in the batches or pass loss_fn(model, batch)")
    return loss


def _weight_grad(layer: SparseAdapterLayer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``∂L/∂W`` in storage layout from the layer input and output gradient (fp32)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    g2 = g.reshape(-1, g.shape[-1]).float()
    return x2.T @ g2 if layer.transposed else g2.T @ x2


@contextmanager
def _calibration_state(model: nn.Module, layers: dict[str, SparseAdapterLayer], adapter_name: str):
    """Only ``adapter_name`` active and differentiable, eval mode, grads untouched; all restored afterwards."""
    was_training = model.training
    saved_active = {name: list(layer.active_adapters) for name, layer in layers.items()}
    saved_grad = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    try:
        model.eval()
        for layer in layers.values():
            if layer.merged:
                raise ValueError("unmerge the adapters before calibrating masks")
            layer.set_adapter([adapter_name])
            layer.sparse_adapter_values[adapter_name].requires_grad_(True)
        yield
    finally:
        for name, layer in layers.items():
            layer.set_adapter(saved_active[name])
        for p, (requires_grad, grad) in saved_grad.items():
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)


def _take_batches(batches: Iterable[Any], num_batches: int | None) -> list[Any]:
    taken = list(islice(iter(batches), num_batches)) if num_batches is not None else list(batches)
    if not taken:
        raise ValueError("calibrate_masks needs at least one batch")
    return taken


def _all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum ``tensors`` over ranks in place under ``torch.distributed`` (no-op otherwise)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _accumulate_gradients(model, layers, batches, loss_fn, device, progress) -> dict[str, torch.Tensor]:
    buffers = {name: torch.zeros(layer.shape, dtype=torch.float32, device=device) for name, layer in layers.items()}
    handles = []
    for name, layer in layers.items():

        def forward_hook(module, args, output, name=name):
            x = args[0].detach()

            def grad_hook(g: torch.Tensor) -> None:  # returns None: the output gradient is left as it is
                buffers[name].add_(_weight_grad(module, x, g))

            if output.requires_grad:
                output.register_hook(grad_hook)

        handles.append(layer.register_forward_hook(forward_hook))
    try:
        for batch in tqdm(batches, desc="calibrating masks", disable=not progress):
            model.zero_grad(set_to_none=True)
            _loss(model, _to_device(batch, device), loss_fn).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return buffers


def _warmup_scores(model, layers, batches, loss_fn, device, steps, lr, progress) -> dict[str, torch.Tensor]:
    """Train dense deltas for ``steps`` Adam steps, then score |∂L/∂Δ ⊙ Δ| on one more pass."""
    deltas = {
        name: torch.zeros(layer.shape, dtype=torch.float32, device=device, requires_grad=True)
        for name, layer in layers.items()
    }
    handles = []
    for name, layer in layers.items():

        def forward_hook(module, args, output, name=name):
            x = args[0]
            delta = deltas[name].to(x.dtype)
            return output + (x @ delta if module.transposed else x @ delta.T).to(output.dtype)

        handles.append(layer.register_forward_hook(forward_hook))
    optimizer = torch.optim.Adam(list(deltas.values()), lr=lr)
    scores: dict[str, torch.Tensor] = {}
    try:
        bar = tqdm(range(steps + 1), desc="warm-up for mask selection", disable=not progress)
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            _loss(model, _to_device(batches[step % len(batches)], device), loss_fn).backward()
            if step < steps:
                optimizer.step()
        for name, delta in deltas.items():
            scores[name] = (delta.grad * delta.detach()).abs()
    finally:
        for handle in handles:
            handle.remove()
        optimizer.state.clear()
        deltas.clear()
        model.zero_grad(set_to_none=True)
    return scores


def calibrate_masks(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    adapter_name: str | None = None,
    loss_fn: LossFn | None = None,
    score_kind: str | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Choose the adapter's mask from task data and reset its values to zero, ready to train.

    ``batches`` are dicts passed as ``model(**batch)`` (loss from ``labels``) or anything ``loss_fn(model, batch)``
    understands. The score kind defaults to the config's ``mask_init`` (``snip``, ``gradient`` or ``warmup``).
    Under ``torch.distributed`` the gradients (warm-up: the scores) are summed over ranks, so every rank ends
    with the same mask, the one a single process would pick from all ranks' batches.
    Returns the number of stored rows per module.
    """
    root = tuner_root(model)
    adapter_name = _resolve_adapter(root, adapter_name)
    config = getattr(root, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"no adapter named {adapter_name!r}; available: {sorted(getattr(root, 'peft_config', {}))}")
    kind = score_kind or config.mask_init
    if kind not in ("snip", "gradient", "warmup", "magnitude"):
        raise ValueError(f"score_kind must be snip, gradient, warmup or magnitude, got {kind!r}")
    layers = _sparse_layers(root, adapter_name)
    if not layers:
        raise ValueError(f"no sparse adapter layers named {adapter_name!r} in the model")
    taken = _take_batches(batches, num_batches)
    device = next(iter(layers.values())).sparse_adapter_values[adapter_name].device
    with _calibration_state(model, layers, adapter_name):
        if kind == "warmup":
            scores = _warmup_scores(
                model, layers, taken, loss_fn, device, config.warmup_steps, config.warmup_lr, progress
            )
            _all_reduce_sum(scores.values())
        elif kind == "magnitude":
            scores = {n: masks.score(layer.logical_weight(), None, kind) for n, layer in layers.items()}
        else:
            grads = _accumulate_gradients(model, layers, taken, loss_fn, device, progress)
            _all_reduce_sum(grads.values())  # the gradient over all ranks' batches, as on one process
            scores = {}
            for name, layer in layers.items():
                scores[name] = masks.score(layer.logical_weight(), grads.pop(name), kind)
    block = config.block_size
    if config.budget_scope == "global":
        total = sum(layer.sparse_adapter_indices[adapter_name].numel() for layer in layers.values())
        chosen = masks.select_global(scores, total, block)
    else:
        chosen = {
            name: masks.select(scores[name], layer.sparse_adapter_indices[adapter_name].numel(), block)
            for name, layer in layers.items()
        }
    for name, layer in layers.items():
        layer.set_mask(adapter_name, chosen[name])
        config.entries_pattern[name] = int(chosen[name].numel())
    return {name: int(index.numel()) for name, index in chosen.items()}


class SparseMaskCalibrationCallback(TrainerCallback):
    """Calibrate the sparse mask on the first ``num_batches`` training batches before step 0.

    Skipped when training resumes from a checkpoint (the saved mask is kept). ``reselect_steps`` optionally
    re-selects the mask at those global steps early in training (values reset to zero each time).
    """

    def __init__(
        self,
        num_batches: int = 8,
        adapter_name: str | None = None,
        loss_fn: LossFn | None = None,
        reselect_steps: Iterable[int] = (),
        progress: bool = True,
    ) -> None:
        self.num_batches = num_batches
        self.adapter_name = adapter_name
        self.loss_fn = loss_fn
        self.reselect_steps = set(reselect_steps)
        self.progress = progress
        self._dataloader = None

    def _calibrate(self, model: nn.Module) -> None:
        calibrate_masks(
            model, self._dataloader, self.num_batches, self.adapter_name, self.loss_fn, progress=self.progress
        )

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._dataloader = train_dataloader
        if state.global_step == 0 and model is not None and train_dataloader is not None:
            self._calibrate(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self.reselect_steps and model is not None and self._dataloader is not None:
            self._calibrate(model)
            if optimizer is not None:
                optimizer.state.clear()
