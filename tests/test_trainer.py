"""transformers.Trainer with SparseMaskCalibrationCallback: calibrate before step 0, checkpoint, resume, best model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import (
    MaskAtFirstStep,
    assert_is_top_k,
    assert_same_tensors,
    base_weights,
    lm_batches,
    recorded_calibration_batches,
    reference_scores,
    sparse_layers,
    tiny_llama,
)
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from peft_sparse import SparseAdapterConfig, SparseMaskCalibrationCallback

TARGETS = ["q_proj", "v_proj"]


class Examples(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        self.rows = [{k: v[0] for k, v in b.items()} for b in lm_batches(n, seed=1, batch=1)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


@pytest.fixture
def calibration_calls():
    with recorded_calibration_batches() as calls:
        yield calls


def make_model():
    return get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=TARGETS, mask_init="gradient"))


def arguments(out: Path, max_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=5e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the *worst* loss: the first checkpoint, so loading it is visible
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )


def saved_adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "adapter_model.safetensors")


def assert_model_matches_checkpoint(model, checkpoint: Path) -> None:
    tensors = saved_adapter(checkpoint)
    for name, layer in sparse_layers(model).items():
        assert torch.equal(
            layer.sparse_adapter_indices["default"], tensors[f"base_model.model.{name}.sparse_adapter_indices"]
        )
        assert torch.equal(
            layer.sparse_adapter_values["default"].detach(), tensors[f"base_model.model.{name}.sparse_adapter_values"]
        )


def test_train_checkpoint_resume_and_best_model(tmp_path, calibration_calls):
    data = Examples()
    base = tiny_llama()

    # --- first run: the callback calibrates on the first batches before step 0 --------------------------------
    model = make_model()
    magnitude = {n: layer.sparse_adapter_indices["default"].clone() for n, layer in sparse_layers(model).items()}
    before = base_weights(model)
    first_step = MaskAtFirstStep()
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=4),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[SparseMaskCalibrationCallback(num_batches=2, progress=False), first_step],
    )
    trainer.train()
    assert len(calibration_calls) == 1 and len(calibration_calls[0]) == 2
    assert first_step.values_zero
    scores = reference_scores(base, list(first_step.masks), calibration_calls[0], "gradient")
    for name, mask in first_step.masks.items():
        assert_is_top_k(mask, scores[name], mask.numel())
    assert any(not torch.equal(magnitude[n], m) for n, m in first_step.masks.items())
    assert_same_tensors(base_weights(model), before)  # training touched only the adapter

    checkpoints = {p.name: p for p in tmp_path.glob("checkpoint-*")}
    assert set(checkpoints) == {"checkpoint-2", "checkpoint-4"}
    for checkpoint in checkpoints.values():  # the mask does not change during training
        tensors = saved_adapter(checkpoint)
        for name, mask in first_step.masks.items():
            assert torch.equal(tensors[f"base_model.model.{name}.sparse_adapter_indices"], mask)

    # load_best_model_at_end restored the first checkpoint (the "best" by the inverted metric)
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    assert_model_matches_checkpoint(model, checkpoints["checkpoint-2"])
    final_values = saved_adapter(checkpoints["checkpoint-4"])
    assert any(
        not torch.equal(
            layer.sparse_adapter_values["default"].detach(), final_values[f"base_model.model.{n}.sparse_adapter_values"]
        )
        for n, layer in sparse_layers(model).items()
    )

    # --- resume in a fresh model: no recalibration, the checkpoint's mask is kept ------------------------------
    resumed_model = make_model()
    resumed_first_step = MaskAtFirstStep()
    resumed = Trainer(
        model=resumed_model,
        args=arguments(tmp_path / "resumed", max_steps=4),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[SparseMaskCalibrationCallback(num_batches=2, progress=False), resumed_first_step],
    )
    resumed.train(resume_from_checkpoint=str(checkpoints["checkpoint-2"]))
    assert len(calibration_calls) == 1  # not called again
    assert resumed.state.global_step == 4
    for name, mask in first_step.masks.items():
        assert torch.equal(resumed_first_step.masks[name], mask)
        assert torch.equal(sparse_layers(resumed_model)[name].sparse_adapter_indices["default"], mask)
    assert_same_tensors(base_weights(resumed_model), before)


def test_callback_reselects_at_the_given_steps(tmp_path, calibration_calls):
    model = make_model()
    args = arguments(tmp_path, max_steps=3)
    args.eval_strategy = args.save_strategy = "no"
    args.load_best_model_at_end = False
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Examples(),
        callbacks=[SparseMaskCalibrationCallback(num_batches=1, reselect_steps=[2], progress=False)],
    )
    trainer.train()
    assert len(calibration_calls) == 2
    # after re-selection at step 2 the values were reset, then trained for one more step
    optimizer_state = trainer.optimizer.state
    for layer in sparse_layers(model).values():
        values = layer.sparse_adapter_values["default"]
        assert values in optimizer_state and optimizer_state[values]["step"] == 1
