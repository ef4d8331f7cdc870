"""Loading base models (local directory, hub id or the built-in ``tiny``), 4-bit quantization,
LoRA adapters, and loading a finished run for inference.

The hardware decides what it can: float32 on a CPU, bfloat16 on GPUs that have it, float16
on older ones (T4). QLoRA goes through bitsandbytes' NF4, which also runs on the CPU, so the
same code path is exercised by the tests. ``trust_remote_code`` is never turned on implicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ModelError
from .tiny import materialize_tiny

if TYPE_CHECKING:
    from ..core.config import Config

TINY = "tiny"
ADAPTER_CONFIG = "adapter_config.json"
log = logging.getLogger("socratune.modeling")


@dataclass(frozen=True)
class Hardware:
    """What the process runs on; recorded in the summary and used to pick dtypes."""

    device: str  # "cuda" or "cpu"
    name: str
    bf16: bool
    gpu_count: int

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "name": self.name, "bf16": self.bf16, "gpu_count": self.gpu_count}


def detect_hardware() -> Hardware:
    import platform

    import torch

    if torch.cuda.is_available():
        return Hardware("cuda", torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported(),
                        torch.cuda.device_count())
    return Hardware("cpu", platform.processor() or platform.machine(), False, 0)


def resolve_precision(precision: str, hardware: Hardware) -> str:
    """Mixed precision actually used: ``fp32``, ``fp16`` or ``bf16``.

    Mixed precision needs a GPU here; on a CPU every choice falls back to fp32 (the CPU's
    fp16 autocast is slower than fp32 and bf16 is not reliable on every CPU).
    """
    if hardware.device != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if hardware.bf16 else "fp16"
    if precision == "bf16" and not hardware.bf16:
        return "fp16"
    return precision


def resolve_dtype(name: str, hardware: Hardware):
    import torch

    if name == "auto" or hardware.device != "cuda":
        if hardware.device != "cuda":
            return torch.float32
        return torch.bfloat16 if hardware.bf16 else torch.float16
    return getattr(torch, name)


def resolve_model_source(name_or_path: str, tiny_dir: Path) -> str:
    """Where to load from: the tiny model's directory (built on first use), a local directory,
    or a hub id. A path-looking name that does not exist is an error, not a hub lookup."""
    if name_or_path == TINY:
        # Absolute: PEFT records it in adapter_config.json and resolves it against the CWD of
        # whoever loads the adapter, so a relative path works from one directory only.
        return str(materialize_tiny(tiny_dir).resolve())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory but holds no config.json: not a transformers model")
        _check_model_dir(path)
        return str(path.resolve())
    if name_or_path.startswith((".", "/", "~")) or path.exists() or name_or_path.count("/") > 1:
        raise ModelError(f"model directory {name_or_path} does not exist")
    return name_or_path


def load_failure(what: str, source: str, exc: BaseException) -> ModelError:
    """A ModelError in one line for files transformers could not load: a garbage config.json or
    tokenizer.json raises anything from OSError to ValueError, KeyError or the tokenizers
    library's own Exception, often with a message of many lines."""
    lines = str(exc).strip().splitlines()
    detail = lines[0][:200] if lines else type(exc).__name__
    return ModelError(f"cannot load {what} from {source}: {detail}; is it a complete transformers model directory?")


def _check_model_dir(path: Path) -> None:
    """Refuse a model directory whose config.json is not a JSON object before transformers reads it."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path / 'config.json'} is not valid JSON ({type(exc).__name__}); "
                         "not a usable transformers model") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'} does not hold a JSON object; not a usable transformers model")


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # see load_failure
        raise load_failure("a tokenizer", source, exc) from exc
    if not tokenizer.chat_template:
        raise ModelError(f"the tokenizer of {source} has no chat template; use a chat/instruction model")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked and never trained, so any id works; eos is always present.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: str, hardware: Hardware,
                        sharded: bool = False):
    """bitsandbytes' 4-bit settings.

    ``sharded``: the launch shards parameters over processes (FSDP, DeepSpeed ZeRO-3), which
    flatten and split floating tensors only, so the 4-bit bytes are stored in a floating dtype
    (``bnb_4bit_quant_storage``), as bitsandbytes' and PEFT's FSDP-QLoRA guides prescribe: the
    compute dtype for bfloat16 and float32, float32 for float16 (fp16 mixed precision cannot
    train float16 parameters).
    """
    import torch
    from transformers import BitsAndBytesConfig

    # float16 compute is a GPU choice; bitsandbytes' CPU kernels compute in float32 or bfloat16.
    dtype = getattr(torch, compute_dtype) if hardware.device == "cuda" else torch.float32
    storage = (torch.float32 if dtype == torch.float16 else dtype) if sharded else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage,
    )


def four_bit_placement(hardware: Hardware) -> dict[str, int | str]:
    """Where bitsandbytes quantizes and keeps a 4-bit model: this process's GPU (the current
    device, which ``Ranks.start`` sets from LOCAL_RANK under a launcher; GPU 0 for every process
    would put all copies on one GPU), or the CPU."""
    import torch

    return {"": torch.cuda.current_device()} if hardware.device == "cuda" else {"": "cpu"}


def load_base(
    source: str,
    *,
    hardware: Hardware,
    dtype: str = "auto",
    load_in_4bit: bool = False,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "float16",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    sharded: bool = False,
):
    """Load the frozen base model, in 4-bit when asked (QLoRA), on this process's GPU.

    ``sharded`` (FSDP or ZeRO-3 launches): the 4-bit weights are stored in a floating dtype and
    the rest of the model is loaded in that same dtype, so every tensor can be sharded; a model
    that is not quantized stays on the CPU, for the engine to shard onto the GPUs (the reason to
    shard is a model too large for one GPU).
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, hardware), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        quantization = quantization_config(quant_type, double_quant, compute_dtype, hardware, sharded)
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = four_bit_placement(hardware)
        if sharded:
            kwargs["dtype"] = quantization.bnb_4bit_quant_storage
        elif hardware.device != "cuda":
            kwargs["dtype"] = quantization.bnb_4bit_compute_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # see load_failure
        raise load_failure("model", source, exc) from exc
    if load_in_4bit:
        keep_4bit_layout(model)
    if hardware.device == "cuda" and not load_in_4bit and not sharded:
        model.to("cuda")
    return model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its AVX-512 inference layout.

    On a CPU with AVX-512 BF16, bitsandbytes (0.48 and later) rewrites a ``Linear4bit`` weight in
    place into a packed uint8 layout the first time the layer runs in eval mode without
    gradients, as the style evaluation does during training. From then on that layer computes
    in bfloat16 through a kernel that passes no gradient to its input, the weight is no longer
    stored in ``quant_storage`` (the float dtype FSDP shards), and an FSDP shard is re-gathered
    in the layout its quant state no longer describes. Even for inference it changes the
    numbers (bfloat16 instead of the float32 compute dtype), so a reloaded adapter would not
    reproduce its trained loss and replies would depend on the CPU. The repacking speeds up a
    path that is slow anyway (QLoRA without a GPU); results that are the same on every x86-64
    CPU are worth more, so it is switched off for every 4-bit load.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_configured_base(config: Config, source: str, hardware: Hardware, sharded: bool = False):
    """``load_base`` with the model and quantization settings of ``config`` (every training
    method loads its base this way)."""
    return load_base(source, hardware=hardware, dtype=config.model.dtype, load_in_4bit=config.quant.load_in_4bit,
                     quant_type=config.quant.quant_type, double_quant=config.quant.double_quant,
                     compute_dtype=config.quant.compute_dtype, attn_implementation=config.model.attn_implementation,
                     trust_remote_code=config.model.trust_remote_code, sharded=sharded)


def add_lora(
    model,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    bias: str,
    quantized: bool,
    gradient_checkpointing: bool,
    sharded: bool = False,
):
    """Wrap the base in a trainable LoRA adapter; only adapter weights require grad.

    ``sharded`` (FSDP or ZeRO-3): the model keeps the one dtype it was loaded in, adapters
    included; PEFT's k-bit preparation, which casts norms and embeddings to float32, is skipped,
    as TRL does for sharded QLoRA.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized and not sharded:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in present]
    if missing:
        raise ModelError(f"lora.target_modules {missing} are not modules of this model; it has e.g. "
                         f"{sorted(n for n in present if n.endswith('proj'))[:12]}")
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias=bias, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config, autocast_adapter_dtype=not sharded)


def add_configured_lora(config: Config, base, sharded: bool):
    """``add_lora`` with the LoRA settings of ``config``: a supervised run's fresh adapter, its
    random init drawn from the seed set before."""
    return add_lora(base, r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                    target_modules=config.lora.target_modules, bias=config.lora.bias,
                    quantized=config.quant.load_in_4bit, gradient_checkpointing=config.model.gradient_checkpointing,
                    sharded=sharded)


def load_adapter_for_inference(base, adapter_dir: Path):
    """Attach a saved adapter to ``base`` with plain PEFT, in eval mode."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir} holds no adapter (adapter_config.json missing)")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as exc:  # a damaged adapter_config.json or weights file
        raise load_failure("the adapter", str(adapter_dir), exc) from exc
    model.eval()
    return model


def check_saved_adapter(adapter_dir: Path, model, state_dict: dict[str, Any] | None = None) -> None:
    """Raise ModelError unless ``adapter_dir`` holds exactly the adapter weights of ``model``
    (``state_dict``: its weights gathered from the processes of a sharded run).

    Reads the adapter's files only, not the base: the check for runs whose base may not fit one
    GPU, where reloading the bundle and generating is not possible.
    """
    import torch
    from peft import PeftConfig, get_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    try:
        PeftConfig.from_pretrained(str(adapter_dir))
        saved = load_file(path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"the saved adapter in {adapter_dir} does not load: {exc}") from exc
    expected = get_peft_model_state_dict(model, state_dict=state_dict)
    if saved.keys() != expected.keys():
        raise ModelError(f"{path} holds {len(saved)} tensors, the trained adapter {len(expected)}: "
                         f"{sorted(saved.keys() ^ expected.keys())[:4]} ...")
    for name, weight in expected.items():
        if not torch.equal(saved[name], weight.detach().to("cpu", saved[name].dtype)):
            raise ModelError(f"{path}: {name} differs from the trained weight")


def point_adapters_at_base(run: Any, base: str) -> list[Path]:
    """Make every adapter of ``run`` (final and checkpoints) name ``base`` as its base model, so
    that plain PEFT (``AutoPeftModelForCausalLM.from_pretrained(RUN/adapter)``) finds the
    run's own ``base/`` again after the run directory was moved or copied; returns the adapter
    directories rewritten.

    PEFT can only record one path, resolved against the loader's working directory, so a run
    records the absolute path of its base and any socratune command that opens a moved run
    (``status`` included) re-points it. A checkpoint's manifest is updated with the new file's
    checksum, but only where it vouched for the old one: a damaged checkpoint stays detectably
    damaged. A run on a read-only medium is left as it is (socratune finds the base by the run's
    layout anyway).
    """
    import json

    from ..core.rundir import MANIFEST, file_digest, write_json_atomic

    rewritten = []
    for adapter_dir in [run.adapter_dir, *run.checkpoints()]:
        config_path = adapter_dir / ADAPTER_CONFIG
        try:
            recorded = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict) or recorded.get("base_model_name_or_path") in (None, base):
                continue
            manifest = None
            if (adapter_dir / MANIFEST).exists():
                manifest = json.loads((adapter_dir / MANIFEST).read_text(encoding="utf-8"))
                entry = manifest.get("files", {}).get(ADAPTER_CONFIG)
                if not entry or entry.get("sha256") != file_digest(config_path):
                    continue  # not vouched for by its manifest: leave the evidence alone
            recorded["base_model_name_or_path"] = base
            write_json_atomic(config_path, recorded)
            if manifest is not None:
                manifest["files"][ADAPTER_CONFIG] = {"size": config_path.stat().st_size,
                                                     "sha256": file_digest(config_path)}
                write_json_atomic(adapter_dir / MANIFEST, manifest)
        except (OSError, ValueError, AttributeError) as exc:
            log.debug("adapter %s not re-pointed at %s: %s", adapter_dir, base, exc)
            continue
        rewritten.append(adapter_dir)
    if rewritten:
        log.info("the run was moved: its adapters now name %s as their base (for plain PEFT)", base)
    return rewritten


@dataclass(frozen=True)
class RunModel:
    """Where a run's model comes from: its recorded config, the base to load and the adapter to put on it."""

    config: Any  # socratune.core.config.Config as recorded in the run's config.yaml
    source: str  # the base: the run's tiny directory, a local model directory or a hub id
    adapter_dir: Path
    tokenizer_source: Path  # the adapter's tokenizer where saved with it, else the base's


def resolve_run_model(run_path: str | Path, checkpoint: str | None = None) -> RunModel:
    """The base and adapter of a run: its final adapter, or ``checkpoint`` (a name under
    ``checkpoints/`` or a path).

    The base is found from the run's recorded config, not from the adapter's absolute path, so
    a run directory still works after it has been moved.
    """
    from ..core.config import config_from_dict, read_yaml_file
    from ..core.rundir import CONFIG_YAML, RunDir

    run = RunDir(run_path)
    config_path = run / CONFIG_YAML
    if not config_path.exists():
        raise ModelError(f"{run.path} is not a run directory (no {CONFIG_YAML})")
    config = config_from_dict(read_yaml_file(config_path, "the run's config"), str(config_path))
    source = resolve_model_source(config.model.name_or_path, run.base_dir)
    if config.model.name_or_path == TINY:
        point_adapters_at_base(run, source)
    adapter_dir = run.adapter_dir
    if checkpoint:
        adapter_dir = Path(checkpoint) if Path(checkpoint).is_dir() else run.checkpoints_dir / checkpoint
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(source)
    return RunModel(config, source, adapter_dir, tokenizer_source)


def load_for_inference(run_path: str | Path, checkpoint: str | None = None, base_only: bool = False):
    """``(model, tokenizer)`` of a run: its base with the final adapter, a checkpoint's adapter
    (``checkpoint`` = name under ``checkpoints/`` or a path), or the untuned base (``base_only``).

    A QLoRA run loads its base in 4-bit, as it was trained: on a GPU where CUDA is there, else on
    the CPU through bitsandbytes' CPU kernels, which is logged as a warning since it is much slower.
    """
    resolved = resolve_run_model(run_path, checkpoint)
    config = resolved.config
    hardware = detect_hardware()
    if config.quant.load_in_4bit and hardware.device != "cuda":
        log.warning("QLoRA run and no CUDA device: the 4-bit base runs on the CPU (bitsandbytes' CPU kernels), "
                    "much slower than on a GPU")
    tokenizer = load_tokenizer(str(resolved.tokenizer_source), config.model.trust_remote_code)
    base = load_base(resolved.source, hardware=hardware, dtype=config.model.dtype,
                     load_in_4bit=config.quant.load_in_4bit, quant_type=config.quant.quant_type,
                     double_quant=config.quant.double_quant, compute_dtype=config.quant.compute_dtype,
                     attn_implementation=config.model.attn_implementation,
                     trust_remote_code=config.model.trust_remote_code)
    if base_only:
        base.eval()
        return base, tokenizer
    return load_adapter_for_inference(base, resolved.adapter_dir), tokenizer
