"""One rank of a 2-process FSDP2 check on the CPU (gloo); tests/test_sharded_qlora.py starts it
under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_driver.py BASE_DIR OUT_DIR

Every rank builds the QLoRA model the way ``socratune train`` does under an FSDP launch
(``sharded=True``), keeps an unsharded twin with the same weights, shards the other with
``torch.distributed.fsdp.fully_shard`` (the FSDP2 that accelerate applies on GPUs) per decoder
layer and at the root, and takes two AdamW steps on both with the same batch. Then:

- rank 0 saves the adapter gathered from the shards to ``OUT_DIR/adapter`` and checks the
  files against the trained weights, as ``socratune train`` does at the end of a sharded run;
- both models generate replies, the sharded one with every rank in step, as the style
  evaluation does;
- all save ``OUT_DIR/checkpoint-2`` with accelerate's FSDP checkpoint functions, as the Trainer
  does under FSDP, load it into a new sharded model and optimizer, and take one more step there
  and on the original.

``OUT_DIR/rank-N.json`` holds what the test compares: losses, the largest differences between
LoRA weights, the replies, the dtypes of the model's parameters, and how many bytes of 4-bit
weights this rank holds against the whole model.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import (
    FullyShardedDataParallelPlugin,
    load_fsdp_model,
    load_fsdp_optimizer,
    save_fsdp_model,
    save_fsdp_optimizer,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from socratune.generation.generate import GenParams, generate_replies
from socratune.model.modeling import (
    Hardware,
    add_lora,
    check_saved_adapter,
    load_base,
    load_tokenizer,
)
from socratune.training.distributed import gather_trainable_shards

STEPS = 2
PROMPTS = {0: ["勇気とは何だろうか？", "正義とは何か、教えてください。"],
           1: ["幸福とは？", "友情と利益は両立しますか？長く考えてみたいのです。"]}


def four_bit_bytes(model: torch.nn.Module, names: set[str]) -> int:
    """Bytes of the 4-bit weights ``names`` held by this process (its shard, once sharded)."""
    total = 0
    for name, parameter in model.named_parameters():
        if name in names:
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            total += local.numel() * local.element_size()
    return total


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def build(base_dir: str) -> torch.nn.Module:
    """The QLoRA model as ``socratune train`` builds it under an FSDP launch, LoRA B made non-zero."""
    base = load_base(base_dir, hardware=Hardware("cpu", "cpu", False, 0), load_in_4bit=True, sharded=True)
    torch.manual_seed(0)
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                     quantized=True, gradient_checkpointing=False, sharded=True)
    for name, parameter in model.named_parameters():  # LoRA B starts at zero: let the adapter act from step 0
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def shard(model: torch.nn.Module) -> None:
    """FSDP2 as accelerate applies it with examples/accelerate/fsdp.yaml: each decoder layer, then the root."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "generate")  # as transformers' Trainer does under FSDP2


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def main(base_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build(base_dir)
    four_bit = {name for name, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    twin = copy.deepcopy(model)
    initial_lora = lora_weights(twin)
    whole_bytes = four_bit_bytes(model, four_bit)
    shard(model)

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (2, 24), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    optimizer = optimizer_for(model)
    sharded_losses = train_steps(model, optimizer, batch, STEPS)
    twin_losses = train_steps(twin, optimizer_for(twin), batch, STEPS)
    twin_lora = lora_weights(twin)
    gathered = gather_trainable_shards(model)
    if rank == 0:  # what socratune train saves as the final adapter under FSDP, and its check
        model.save_pretrained(Path(out_dir, "adapter"), state_dict=gathered)
        check_saved_adapter(Path(out_dir, "adapter"), model, gathered)
    with torch.no_grad():
        trained_loss = twin(**batch).loss.item()

    # Style evaluation under FSDP: every rank generates in step (here each from its own prompts).
    tokenizer = load_tokenizer(base_dir)
    prompts = [[{"role": "user", "content": text}] for text in PROMPTS[rank]]
    params = GenParams(max_new_tokens=8)
    sharded_replies = generate_replies(model, tokenizer, prompts, params, batch_size=2, synced=True)
    twin_replies = generate_replies(twin, tokenizer, prompts, params, batch_size=2)

    # A checkpoint as the Trainer writes it under FSDP (through accelerate), resumed into a new model.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    process = PartialState()  # the process index and count these functions ask of an Accelerator
    checkpoint = Path(out_dir, f"checkpoint-{STEPS}")
    save_fsdp_model(plugin, process, model, checkpoint, adapter_only=True)
    save_fsdp_optimizer(plugin, process, optimizer, model, checkpoint)
    resumed = build(base_dir)
    for name, parameter in resumed.named_parameters():  # anything but the trained weights
        if "lora_" in name:
            torch.nn.init.zeros_(parameter)
    shard(resumed)
    resumed_optimizer = optimizer_for(resumed)
    load_fsdp_model(plugin, process, resumed, checkpoint, adapter_only=True)
    load_fsdp_optimizer(plugin, process, resumed_optimizer, resumed, checkpoint)
    continued_losses = train_steps(model, optimizer, batch, 1)
    resumed_losses = train_steps(resumed, resumed_optimizer, batch, 1)
    continued, after_resume = gather_trainable_shards(model), gather_trainable_shards(resumed)

    result = {
        "sharded_losses": sharded_losses,
        "unsharded_losses": twin_losses,
        "trained_loss": trained_loss,
        "input_ids": ids.tolist(),
        "gathered_max_difference": max((gathered[n] - twin_lora[n]).abs().max().item() for n in twin_lora),
        "gathered_names_match": sorted(gathered) == sorted(twin_lora),
        "lora_moved": max((twin_lora[n] - initial_lora[n]).abs().max().item() for n in twin_lora),
        "continued_losses": continued_losses,
        "resumed_losses": resumed_losses,
        "resumed_max_difference": max((after_resume[n] - continued[n]).abs().max().item() for n in continued),
        "four_bit_bytes_here": four_bit_bytes(model, four_bit),
        "four_bit_bytes_whole": whole_bytes,
        "dtypes": sorted({str(p.dtype) for p in twin.parameters()}),
        "sharded_replies": sharded_replies,
        "unsharded_replies": twin_replies,
    }
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
