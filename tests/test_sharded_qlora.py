"""QLoRA under FSDP / DeepSpeed ZeRO-3: which launches count as sharded, the 4-bit storage dtype
they get, and a 2-process FSDP2 run on the CPU (gloo) of the model ``socratune train`` builds for
them: it shards the 4-bit weights (each process holds half), trains exactly like the unsharded
model, generates the same replies with every process in step (the style evaluation's way under
FSDP), the adapter gathered from the shards saves and loads as the trained one, and a checkpoint
written and read by accelerate's FSDP functions (as the Trainer does) resumes exactly and passes
socratune's checkpoint validation. accelerate applies FSDP only on GPUs, so the CPU check calls torch's
``fully_shard`` directly, as accelerate's FSDP2 path does.

Run: ``python -m pytest -q tests/test_sharded_qlora.py`` (about 30 s on two cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from socratune.core.errors import ModelError
from socratune.core.rundir import checkpoint_problem, write_manifest
from socratune.model.modeling import (
    Hardware,
    add_lora,
    check_saved_adapter,
    four_bit_placement,
    load_adapter_for_inference,
    load_base,
    quantization_config,
)
from socratune.training.distributed import sharding_engine
from test_distributed import torchrun

DRIVER = Path(__file__).with_name("fsdp_driver.py")
GPU = Hardware("cuda", "test GPU", True, 1)
CPU = Hardware("cpu", "cpu", False, 0)


@pytest.mark.parametrize(("variables", "engine"), [
    ({"ACCELERATE_USE_FSDP": "true"}, "fsdp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "deepspeed-zero3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None),
    ({"ACCELERATE_USE_FSDP": "false"}, None),
    ({}, None),
])
def test_only_launches_that_shard_parameters_count_as_sharded(monkeypatch, variables, engine):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert sharding_engine() == engine


@pytest.mark.parametrize(("compute", "storage"), [("bfloat16", torch.bfloat16), ("float16", torch.float32),
                                                  ("float32", torch.float32)])
def test_sharded_launches_store_4bit_weights_in_a_trainable_floating_dtype(compute, storage):
    sharded = quantization_config("nf4", True, compute, GPU, sharded=True)
    assert (sharded.bnb_4bit_quant_storage, sharded.bnb_4bit_compute_dtype) == (storage, getattr(torch, compute))
    assert quantization_config("nf4", True, compute, GPU).bnb_4bit_quant_storage == torch.uint8


def test_each_process_quantizes_onto_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # as set from LOCAL_RANK=3
    assert four_bit_placement(GPU) == {"": 3}
    assert four_bit_placement(CPU) == {"": "cpu"}


@pytest.mark.slow
def test_the_sharded_build_is_one_dtype_and_computes_what_the_ordinary_qlora_build_does(tmp_path):
    from socratune.model.tiny import save_tiny

    base_dir = save_tiny(tmp_path / "base")
    batch = {"input_ids": torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]
    results = {}
    for sharded in (False, True):
        base = load_base(str(base_dir), hardware=CPU, load_in_4bit=True, sharded=sharded)
        torch.manual_seed(0)
        model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                         quantized=True, gradient_checkpointing=True, sharded=sharded)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[sharded] = (loss.item(), grads, {p.dtype for p in model.parameters()})
    (plain_loss, plain_grads, plain_dtypes), (loss, grads, dtypes) = results[False], results[True]
    assert torch.uint8 in plain_dtypes and dtypes == {torch.float32}  # FSDP shards floating tensors only
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain_grads.keys() and all("lora_" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name])


@pytest.mark.slow
def test_fsdp2_over_two_processes_shards_the_4bit_weights_and_trains_like_one_model(tmp_path):
    from socratune.model.tiny import save_tiny

    base_dir = save_tiny(tmp_path / "base")
    done = torchrun(str(DRIVER), str(base_dir), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text(encoding="utf-8"))
        assert result["dtypes"] == ["torch.float32"]
        assert result["four_bit_bytes_here"] * 2 == result["four_bit_bytes_whole"] > 0
        assert result["sharded_losses"] == pytest.approx(result["unsharded_losses"], abs=1e-5)
        assert result["sharded_losses"][1] < result["sharded_losses"][0]
        assert result["lora_moved"] > 1e-3
        assert result["gathered_names_match"] and result["gathered_max_difference"] < 1e-5
        assert result["sharded_replies"] == result["unsharded_replies"] and all(result["sharded_replies"])
        assert result["resumed_losses"] == result["continued_losses"] and result["resumed_max_difference"] == 0.0
    # The FSDP checkpoint (sharded adapter and optimizer folders) is complete once the Trainer's
    # own files are beside it, and incomplete without the optimizer's folder.
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}), encoding="utf-8")
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        torch.save({}, checkpoint / name)
    write_manifest(checkpoint, world_size=2)
    assert checkpoint_problem(checkpoint) is None
    (checkpoint / "optimizer_0" / ".metadata").unlink()
    write_manifest(checkpoint, world_size=2)
    assert checkpoint_problem(checkpoint).startswith("no optimizer state (optimizer.pt / optimizer_0/.metadata")
    # The adapter rank 0 saved from the gathered shards is the trained one.
    model = load_adapter_for_inference(load_base(str(base_dir), hardware=CPU, load_in_4bit=True), tmp_path / "adapter")
    ids = torch.tensor(result["input_ids"])
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(result["trained_loss"], abs=1e-5)


def test_the_saved_adapter_check_catches_a_changed_or_missing_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from socratune.model.tiny import build_tiny

    model, _ = build_tiny(seed=0)
    lora = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], bias="none", quantized=False,
                    gradient_checkpointing=False)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    lora.save_pretrained(tmp_path)
    check_saved_adapter(tmp_path, lora)

    weights = load_file(tmp_path / "adapter_model.safetensors")
    changed = min(weights)
    weights[changed] = weights[changed] + 1e-3
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ModelError, match=f"{changed} differs from the trained weight"):
        check_saved_adapter(tmp_path, lora)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ModelError, match="does not load"):
        check_saved_adapter(tmp_path, lora)


def test_an_evaluation_during_qlora_training_leaves_the_4bit_weights_and_gradients_as_they_were(tmp_path):
    """On CPUs with AVX-512 BF16, bitsandbytes repacks a 4-bit weight the first time it runs in eval
    mode without gradients (as the style evaluation does mid-training); after that its layer passed
    no gradient to its input. The trained model must compute the same on every CPU."""
    import bitsandbytes as bnb

    from socratune.model.tiny import save_tiny

    base_dir = save_tiny(tmp_path / "base")
    batch = {"input_ids": torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]

    def gradients(model):
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    for sharded in (False, True):
        base = load_base(str(base_dir), hardware=CPU, load_in_4bit=True, sharded=sharded)
        torch.manual_seed(0)
        model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                         quantized=True, gradient_checkpointing=False, sharded=sharded)
        for name, parameter in model.named_parameters():  # LoRA B starts at zero: let every adapter matter
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
        layout = {n: (p.dtype, p.shape) for n, p in model.named_parameters()}
        before = gradients(model)
        model.eval()
        with torch.no_grad():
            model(**batch)
        model.train()
        assert {n: (p.dtype, p.shape) for n, p in model.named_parameters()} == layout
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                       for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        after = gradients(model)
        for name, grad in before.items():
            torch.testing.assert_close(after[name], grad)
