"""The built-in ``tiny`` model: a small Llama-style transformer built offline from a config.

It exists so that ``socratune train`` with no arguments, and the whole test suite, run on a
laptop CPU without downloading anything. The tokenizer is a byte-level BPE trained on the
bundled Japanese dialogues, and the chat template follows Gemma's turn markers
(``<start_of_turn>`` / ``<end_of_turn>``, no system role), so the tiny model exercises exactly
the templating, system folding and end-of-turn training that the real Gemma preset needs.
Everything is a pure function of the seed and the bundled text: two builds are identical.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from ..core.errors import StorageError, os_error_message

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN]

# Gemma's template, same turn markers and same refusal of a system role, so folding is exercised.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

VOCAB_SIZE = 1024
MODEL_SHAPE = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def bundled_texts() -> list[str]:
    """Every turn of the bundled sample dialogues: the tokenizer's training text."""
    raw = (resources.files("socratune") / "assets" / "sample_dialogues_ja.json").read_text(encoding="utf-8")
    return [m["content"] for d in json.loads(raw) for m in d["messages"]]


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(seed: int = 0, texts: list[str] | None = None):
    """Return ``(model, tokenizer)``: fresh weights drawn from ``seed``, tokenizer from ``texts``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts if texts is not None else bundled_texts())
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # embed_tokens and lm_head each get their own LoRA
        **MODEL_SHAPE,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, tokenizer


def save_tiny(directory: Path, seed: int = 0) -> Path:
    """Build the tiny model and save it as an ordinary transformers model directory."""
    model, tokenizer = build_tiny(seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# What a complete saved tiny model holds; config.json must also parse.
TINY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def tiny_is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a whole saved tiny model (not one a killed process left half written)."""
    if not all((directory / name).is_file() for name in TINY_FILES):
        return False
    try:
        return isinstance(json.loads((directory / "config.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def materialize_tiny(directory: Path, seed: int = 0) -> Path:
    """Save the tiny model at ``directory`` unless a complete one is there; never leave half of one.

    The model is saved into a temporary sibling that is renamed into place, so a kill at any
    moment leaves either no ``directory`` or a complete one. A directory an older version left
    incomplete is rebuilt: the tiny model is a pure function of the seed, nothing is lost.
    """
    from ..core.rundir import replace_dir_atomic

    if tiny_is_complete(directory):
        return directory
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            save_tiny(staged, seed)
            replace_dir_atomic(staged, directory)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    except OSError as exc:
        raise StorageError(os_error_message(exc, directory, "saving the tiny base model in")) from exc
    return directory
