"""Padding-free batching: several dialogues share a row, and none of them sees another.

A packed row is a concatenation of whole dialogues whose ``position_ids`` restart at 0 at every
dialogue. transformers (5.x) turns such position ids into a block-diagonal causal mask for the
eager, SDPA and flex attention paths (``masking_utils.find_packed_sequence_indices``; sliding
windows are measured inside each dialogue) and into sequence boundaries for the variable-length
flash kernels. It does so only when no attention mask and no KV cache is given, so a packed
batch carries no ``attention_mask`` and asks for ``use_cache=False``. Gemma-2 keeps its
soft-capping because the attention function itself is unchanged: eager (its default, since it
refuses SDPA) and flex apply the cap, and the final-logit cap is outside attention altogether.

Labels never cross a boundary: the first label of every dialogue is ``IGNORE_INDEX``, so the
last token of one dialogue is never trained to predict the first token of the next (the loss
shifts labels by one). A batch holds the same dialogues as in padded mode (one sampler index
per dialogue, ``batch_size`` per step), so steps, epochs, the LR schedule and the resume order
(a function of seed and epoch, owned by the sampler) are exactly those of padded mode; only the
layout changes.

Why not ``transformers.DataCollatorWithFlattening``: it puts the whole batch in one row. With
the dense attention kernels a CPU has (eager, SDPA), a row of T tokens costs T² attention, so a
batch of eight dialogues in one row spends more on attention than on the rest of a small model.
Here the batch is split into the number of rows that minimises the estimated compute, which
trades a little padding for much shorter rows (see ``pack_rows``).
"""

from __future__ import annotations

from typing import Any

from ..core.errors import ModelError
from .template import IGNORE_INDEX, PaddingCollator


def break_even_context(model: Any) -> float:
    """The context length at which attention costs a token as much as the rest of the model.

    A token's matrix multiplications cost about 2 FLOPs per parameter; attending to one earlier
    position costs about 4 x hidden size FLOPs per layer (scores and weighted sum). For the
    built-in tiny model this is about 1,200 positions, for Gemma-2 2B about 22,000: the larger
    the model, the longer a packed row can be before attention dominates.
    """
    config = model.config.get_text_config()
    parameters = sum(p.numel() for p in model.parameters())  # 4-bit weights count half: a small bias
    return parameters / (2 * config.hidden_size * config.num_hidden_layers)


def _assign(lengths: list[int], rows: int) -> list[list[int]]:
    """Longest dialogue first into the currently shortest row: balanced rows, deterministic."""
    totals, members = [0] * rows, [[] for _ in range(rows)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = min(range(rows), key=lambda r: (totals[r], r))
        totals[row] += lengths[index]
        members[row].append(index)
    return [sorted(m) for m in members if m]


def pack_rows(lengths: list[int], break_even: float) -> list[list[int]]:
    """Group dialogue indices into rows so that the estimated compute is least.

    Every row is padded to the longest one (M tokens); the batch then costs about
    ``rows x M x (break_even + M)``: linear work per position plus dense attention over the row.
    One row has no padding but the longest attention span; one dialogue per row is ordinary
    padding. Every row count in between is tried (a batch has at most a few dozen dialogues).
    """

    def cost(rows: list[list[int]]) -> float:
        longest = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows) * longest * (break_even + longest)

    return min((_assign(lengths, count) for count in range(1, len(lengths) + 1)), key=cost)


class PackingCollator:
    """Packs a batch of tokenized dialogues into few rows with restarting position ids.

    Rows are padded to the longest row; padding is its own segment (positions from 0, labels
    ignored), so it is never attended to by a dialogue.
    """

    def __init__(self, pad_token_id: int, break_even: float):
        self.pad_token_id = pad_token_id
        self.break_even = break_even

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        rows = pack_rows([len(f["input_ids"]) for f in features], self.break_even)
        width = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
        ids, labels, positions = [], [], []
        for row in rows:
            row_ids, row_labels, row_positions = [], [], []
            for index in row:
                feature = features[index]
                row_ids += feature["input_ids"]
                row_labels += [IGNORE_INDEX] + feature["labels"][1:]
                row_positions += range(len(feature["input_ids"]))
            pad = width - len(row_ids)
            ids.append(row_ids + [self.pad_token_id] * pad)
            labels.append(row_labels + [IGNORE_INDEX] * pad)
            positions.append(row_positions + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "use_cache": False,  # with a cache transformers ignores the boundaries in position_ids
        }


def check_packing(model: Any, pad_token_id: int) -> None:
    """Raise ModelError unless this model keeps packed dialogues apart.

    Two short sequences are run packed in one row and one by one; their logits must agree.
    Checked, not assumed: an attention implementation or remote model code that ignores
    position-id boundaries would otherwise let dialogues attend to each other silently.
    """
    import torch

    vocab = model.config.get_text_config().vocab_size
    first, second = [(3 + 7 * i) % vocab for i in range(5)], [(11 + 5 * i) % vocab for i in range(7)]
    features = [{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}]
    device = next(model.parameters()).device
    packed = PackingCollator(pad_token_id, break_even=float("inf"))(features)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                             use_cache=False).logits[0].float()
            apart = torch.cat([model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()
                               for ids in (first, second)])
    finally:
        model.train(was_training)
    scale = float(apart.abs().max())
    if not torch.allclose(together, apart, rtol=1e-2, atol=1e-2 * max(scale, 1.0)):
        implementation = model.config.get_text_config()._attn_implementation
        raise ModelError(
            f"this model lets packed dialogues attend to each other (attention implementation "
            f"'{implementation}' ignores position-id boundaries); set data.batching: padded"
        )


def make_collator(batching: str, model: Any, pad_token_id: int) -> PaddingCollator | PackingCollator:
    """The collator for ``data.batching``; packing is verified on the model first."""
    if batching == "padded":
        return PaddingCollator(pad_token_id)
    check_packing(model, pad_token_id)
    return PackingCollator(pad_token_id, break_even_context(model))
