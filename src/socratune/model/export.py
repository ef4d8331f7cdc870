"""``socratune export``: the adapter merged into its base, as a transformers model and/or a GGUF file.

    socratune export runs/tiny --merged exports/tiny          # AutoModelForCausalLM.from_pretrained loads it
    socratune export runs/tiny --gguf exports/tiny.gguf       # llama.cpp, and exports/tiny.Modelfile for Ollama
    socratune export runs/gemma --merged exports/gemma --checkpoint checkpoint-400

The merge happens on the CPU with PEFT's ``merge_and_unload`` on the base loaded unquantized: in
the dtype the run recorded (``model.dtype``, or the base's own for ``auto``), and for a QLoRA run
in ``quant.compute_dtype``. A QLoRA adapter is never merged into 4-bit weights: they would have to
be re-quantized afterwards, and rounding to 4 bits wipes out most of an adapter's small update.

The GGUF writer covers Llama-architecture models with a byte-level BPE tokenizer (the built-in
``tiny`` model is one): tensors named and laid out per llama.cpp's conventions, 2-D weights in
the merged dtype and norms in float32, and the tokenizer (tokens, types, merges, special ids,
chat template) as metadata. Other architectures (Gemma-2 among them) are refused with a pointer
to llama.cpp's ``convert_hf_to_gguf.py``, which reads the ``--merged`` directory.

Nothing is overwritten unless asked (``force``); outputs are written beside their target under a
temporary name and renamed into place, so an interrupted export leaves no half-written model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, ModelError
from ..core.rundir import replace_dir_atomic, temp_dir, temp_file, write_text_atomic
from .modeling import (
    RunModel,
    load_adapter_for_inference,
    load_failure,
    load_tokenizer,
    resolve_run_model,
)


@dataclass
class ExportResult:
    merged_dir: Path | None
    gguf_path: Path | None
    dtype: str  # of the merged weights, e.g. "float32"
    gguf_type: str | None  # of the GGUF's 2-D weights, e.g. "F32"
    modelfile: Path | None = None  # the Ollama Modelfile beside the GGUF
    notes: list[str] = field(default_factory=list)  # what the user should know about how it was done


def _check_target(path: Path, force: bool, flag: str) -> None:
    """Refuse to replace anything that holds data unless ``force``; a directory may not stand
    where a file goes or the other way round, even with ``force``."""
    if not path.exists():
        return
    wants_dir = flag == "--merged"
    if path.is_dir() != wants_dir:
        raise ConfigError(f"{flag} {path}: a {'file' if wants_dir else 'directory'} is in the way", key=flag)
    if not force and (not wants_dir or any(path.iterdir())):
        raise ConfigError(f"{flag} {path} already exists{' and is not empty' if wants_dir else ''}; "
                          "pass --force to replace it", key=flag)


def _overlaps(a: Path, b: Path) -> bool:
    """Whether one of two resolved paths is the other or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def _check_placement(path: Path, flag: str, protected: dict[str, Path]) -> None:
    """Refuse, even with ``--force``, a target that would replace or land inside something export
    reads or must keep (the run directory, the --merged output, the base model, the adapter), or
    whose parent is a file."""
    resolved = Path(os.path.realpath(path))  # realpath: a symlink loop is compared, not raised
    for what, kept in protected.items():
        if _overlaps(resolved, Path(os.path.realpath(kept))):
            raise ConfigError(f"{flag} {path} overlaps {what} {kept}; export writes outside it "
                              "(choose a path that neither lies inside it nor contains it)", key=flag)
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory; choose another path", key=flag)
            break


def merged_dtype(config: Any, source: str):
    """The dtype to merge and save in: the QLoRA compute dtype, the configured dtype, or the base's own."""
    import torch
    from transformers import AutoConfig

    if config.quant.load_in_4bit:
        return getattr(torch, config.quant.compute_dtype)
    if config.model.dtype != "auto":
        return getattr(torch, config.model.dtype)
    stored = AutoConfig.from_pretrained(source, trust_remote_code=config.model.trust_remote_code).dtype
    if stored is None:
        return torch.float32
    return stored if isinstance(stored, torch.dtype) else getattr(torch, stored)


def merge_run(resolved: RunModel) -> tuple[Any, list[str]]:
    """``(merged model, notes)``: the run's adapter folded into its base's weights on the CPU;
    the result is a plain transformers model."""
    from transformers import AutoModelForCausalLM

    config = resolved.config
    notes = []
    if config.quant.load_in_4bit:
        notes.append("QLoRA run: the adapter is merged into the base loaded unquantized in "
                     f"{config.quant.compute_dtype} "
                     "(quant.compute_dtype), not into 4-bit weights; quantize the merged model afterwards if you "
                     "need it smaller")
    try:
        base = AutoModelForCausalLM.from_pretrained(resolved.source, dtype=merged_dtype(config, resolved.source),
                                                    trust_remote_code=config.model.trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for broken files
        raise load_failure("model", resolved.source, exc) from exc
    merged = load_adapter_for_inference(base, resolved.adapter_dir).merge_and_unload()
    merged.eval()
    return merged, notes


def save_merged(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Save model and tokenizer into a staging directory beside ``out_dir``, then move it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = temp_dir(out_dir.parent, out_dir.name)
    try:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        replace_dir_atomic(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


# --- GGUF -----------------------------------------------------------------------------------

def _gguf_type(dtype) -> tuple[Any, Any]:
    """``(tensor type, file type)`` for 2-D weights kept in ``dtype``."""
    import gguf
    import torch

    types = {torch.float32: (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
             torch.float16: (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
             torch.bfloat16: (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
    return types[dtype]


def _rope_interleave(weight, heads: int):
    """Reorder q/k projection rows from HF's rotary layout (first half, second half of each head)
    to llama.cpp's (pairs of neighbours), which its rope kernel for Llama expects."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_llama(config: Any, tokenizer: Any) -> None:
    """Refuse a model or tokenizer this writer cannot express in llama.cpp's terms."""
    import json

    hint = ("; for other models run llama.cpp's convert_hf_to_gguf.py on the directory that "
            "`socratune export RUN --merged DIR` writes")
    if config.model_type != "llama":
        raise ModelError(f"GGUF export supports Llama-architecture models; this one is {config.model_type!r}{hint}")
    rope = (config.rope_parameters or {}).get("rope_type", "default")
    if rope != "default" or config.hidden_act != "silu":
        raise ModelError(f"GGUF export supports plain Llama (default rope, silu); this model has rope {rope!r} "
                         f"and activation {config.hidden_act!r}{hint}")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    byte_level_bpe = (spec["model"]["type"] == "BPE" and not spec["model"].get("byte_fallback")
                      and (spec.get("decoder") or {}).get("type") == "ByteLevel" and spec.get("normalizer") is None
                      and pre.get("type") == "ByteLevel" and pre.get("use_regex", True))
    if not byte_level_bpe:
        raise ModelError("GGUF export supports GPT-2-style byte-level BPE tokenizers (as the built-in tiny model's)"
                         + hint)


def write_gguf(model: Any, tokenizer: Any, path: Path, name: str) -> str:
    """Write ``model`` (a merged Llama) and its tokenizer as GGUF at ``path``; returns the weights' type name."""
    import gguf
    import torch

    config = model.config
    _check_llama(config, tokenizer)
    tensor_type, file_type = _gguf_type(model.dtype)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"tensor {hf_name} has no llama.cpp name; this model is not plain Llama")
        data = tensor.detach().to(torch.float32)
        if hf_name.endswith("q_proj.weight"):
            data = _rope_interleave(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _rope_interleave(data, kv_heads)
        array = data.numpy()
        if array.ndim == 1:  # norms stay float32, as llama.cpp expects
            writer.add_tensor(gguf_name, array)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)

    _add_tokenizer(writer, model, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return tensor_type.name


def _add_tokenizer(writer: Any, model: Any, tokenizer: Any) -> None:
    """Vocabulary, token types, merges, special ids and chat template under llama.cpp's keys.

    Token strings are the byte-level spellings from the vocabulary (what llama.cpp's ``gpt2``
    tokenizer model reads); special tokens are CONTROL so llama.cpp parses them whole. Merges,
    special ids and the chat template come from gguf's own ``SpecialVocab`` reading the saved
    tokenizer files; add-BOS/EOS from what the tokenizer does; the end-of-turn id from the
    generation config becomes EOT, so llama.cpp stops a reply where the model ends its turn.
    """
    import gguf

    n_vocab = model.config.vocab_size
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    tokens, types = [], []
    for token_id in range(n_vocab):
        if token_id >= len(tokenizer):  # embedding rows beyond the tokenizer (padding for alignment)
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tokenizer.convert_ids_to_tokens(token_id))
        types.append(gguf.TokenType.CONTROL if token_id in special
                     else gguf.TokenType.USER_DEFINED if token_id in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex of ByteLevel(use_regex=True), checked above
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as saved:
        tokenizer.save_pretrained(saved)
        special_vocab = gguf.SpecialVocab(saved, load_merges=True, n_vocab=n_vocab)
    # Whether BOS/EOS are added is what the tokenizer does, not what its files may or may not state:
    # llama.cpp would otherwise guess, and a chat template that writes <bos> itself would get two.
    probe = tokenizer("a")["input_ids"]
    special_vocab.add_special_token = {"bos": probe[0] == tokenizer.bos_token_id,
                                       "eos": probe[-1] == tokenizer.eos_token_id}
    special_vocab.add_to_gguf(writer, quiet=True)
    eos = model.generation_config.eos_token_id
    end_of_turn = [i for i in (eos if isinstance(eos, list) else [eos])
                   if i is not None and i != tokenizer.eos_token_id]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])


def export(run_path: str | Path, merged_dir: str | Path | None = None, gguf_path: str | Path | None = None,
           checkpoint: str | None = None, force: bool = False,
           ollama_parameters: dict[str, float | int] | None = None) -> ExportResult:
    """Merge a run's adapter into its base and write what is asked: a transformers directory, a GGUF file, or both;
    beside a GGUF, an Ollama Modelfile with ``ollama_parameters`` (``modelfile.ollama_parameters``) as its defaults."""
    merged_target = Path(merged_dir) if merged_dir else None
    gguf_target = Path(gguf_path) if gguf_path else None
    if merged_target is None and gguf_target is None:
        raise ConfigError("nothing to export: give a merged directory and/or a GGUF path")
    if gguf_target and (str(gguf_path).endswith(("/", os.sep)) or gguf_target.is_dir()):
        raise ConfigError(f"--gguf {gguf_path} is a directory; give a file path such as {gguf_target / 'model.gguf'}",
                          key="--gguf")
    protected = {"the run directory": Path(run_path)}
    if merged_target:
        _check_placement(merged_target, "--merged", protected)
        protected["the --merged directory"] = merged_target  # replaced whole, a GGUF inside would go with it
    if gguf_target:
        _check_placement(gguf_target, "--gguf", protected)
    if merged_target:
        _check_target(merged_target, force, "--merged")
    if gguf_target:
        _check_target(gguf_target, force, "--gguf")
        _check_target(modelfile_path(gguf_target), force, "--gguf")
    resolved = resolve_run_model(run_path, checkpoint)
    # What the export reads: a local base (the tiny one lies in the run directory, checked above) and
    # the adapter, which --checkpoint may take from outside the run.
    inputs = {"the adapter": resolved.adapter_dir}
    if Path(resolved.source).is_dir():
        inputs["the base model"] = Path(resolved.source)
    for target, flag in ((merged_target, "--merged"), (gguf_target, "--gguf")):
        if target:
            _check_placement(target, flag, inputs)
    tokenizer = load_tokenizer(str(resolved.tokenizer_source), resolved.config.model.trust_remote_code)
    if gguf_target:  # an unsupported model is refused before the merge and before anything is written
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(resolved.source,
                                                      trust_remote_code=resolved.config.model.trust_remote_code)
        except Exception as exc:  # a broken config.json: OSError, ValueError, KeyError...
            raise load_failure("the model config", resolved.source, exc) from exc
        _check_llama(model_config, tokenizer)
    model, notes = merge_run(resolved)
    if merged_target:
        save_merged(model, tokenizer, merged_target)
    gguf_type = write_gguf(model, tokenizer, gguf_target, Path(run_path).resolve().name) if gguf_target else None
    modelfile = None
    if gguf_target:
        try:
            modelfile = write_modelfile(gguf_target, tokenizer, model.generation_config, ollama_parameters or {})
        except ConfigError as exc:  # the GGUF is good without one; say why there is none
            notes.append(str(exc))
    return ExportResult(merged_target, gguf_target, str(model.dtype).removeprefix("torch."), gguf_type, modelfile,
                        notes)


def modelfile_path(gguf_path: Path) -> Path:
    """``exports/tiny.gguf`` -> ``exports/tiny.Modelfile``."""
    return gguf_path.with_suffix(".Modelfile")


def write_modelfile(gguf_path: Path, tokenizer: Any, generation_config: Any,
                    parameters: dict[str, float | int]) -> Path:
    """The Ollama Modelfile beside the GGUF (modelfile.py): the run's template, stops and the
    sampling ``parameters``. Raises ConfigError when the template has no fixed shape."""
    from .modelfile import modelfile_text, stop_strings, turn_wrappers

    probe = tokenizer("a")["input_ids"]  # as _add_tokenizer records it: does the tokenizer add BOS itself
    text = modelfile_text(gguf_path, turn_wrappers(tokenizer), stop_strings(tokenizer, generation_config),
                          parameters, adds_bos=bool(probe) and probe[0] == tokenizer.bos_token_id)
    path = modelfile_path(gguf_path)
    write_text_atomic(path, text)
    return path
