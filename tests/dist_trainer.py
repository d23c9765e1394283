"""``transformers.Trainer`` + ``SparseMaskCalibrationCallback`` under ``torchrun`` on CPU (gloo): the docs' recipe.

``torchrun --standalone --nproc_per_node 2 tests/dist_trainer.py OUT_DIR``: DDP over gloo. Calibrates before step
0, re-selects at step 2, trains to step 4; saves each rank's masks and values right after the re-selection and at the
end. (Trainer's FSDP path cannot run here: accelerate enables FSDP only on accelerators and silently trains DDP on
CPU, so ``fully_shard`` is tested directly in ``dist_calibration.py``.)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import lm_batches, sparse_layers, tiny_llama  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from peft_sparse import SparseAdapterConfig, SparseMaskCalibrationCallback  # noqa: E402


class Examples(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.rows = [{k: v[0] for k, v in b.items()} for b in lm_batches(n, seed=1, batch=1)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.clone()


class Recorder(TrainerCallback):
    """Runs after the calibration callback: snapshots masks and whole values after the step-2 re-selection."""

    def __init__(self, layers: dict) -> None:
        self.layers = layers
        self.snapshots: dict[str, dict] = {}

    def snapshot(self) -> dict:
        return {
            "masks": {n: layer.sparse_adapter_indices["default"].clone() for n, layer in self.layers.items()},
            "values": {n: whole(layer.sparse_adapter_values["default"]) for n, layer in self.layers.items()},
            "value_types": {type(layer.sparse_adapter_values["default"]).__name__ for layer in self.layers.values()},
        }

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self.snapshots["after_reselect"] = self.snapshot()

    def on_train_end(self, args, state, control, **kwargs):
        self.snapshots["end"] = self.snapshot()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    config = SparseAdapterConfig(target_modules=["q_proj", "v_proj", "down_proj"], mask_init="gradient")
    model = get_peft_model(tiny_llama(layers=2), config)
    layers = sparse_layers(model)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=0.05,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    recorder = Recorder(layers)
    callbacks = [SparseMaskCalibrationCallback(num_batches=2, reselect_steps=[2], progress=False), recorder]
    trainer = Trainer(model=model, args=args, train_dataset=Examples(32), callbacks=callbacks)
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.save({"world_size": world, **recorder.snapshots}, os.path.join(out_dir, f"trainer-rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
