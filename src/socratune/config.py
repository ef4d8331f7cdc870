"""Typed run configuration: one YAML file per run, presets underneath, CLI flags on top.

A config is built in three layers, each overriding the one before:

1. a preset shipped in ``socratune/presets/`` (``tiny`` unless another is named),
2. the user's YAML file (which may name its own ``preset:``),
3. flags from the command line, given as dotted keys (``{"model.name_or_path": "..."}``).

Every section forbids unknown keys, so a typo is an error that names the key and the keys
allowed there, never a silently ignored setting. Only ``train.py`` and ``cli.py`` see the whole
config; components take plain arguments.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, os_error_message, quote_capped

DEFAULT_PRESET = "tiny"


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    # allow_inf_nan=False: `epochs: .inf` or `.nan` in YAML is a mistake to name, not a run that never ends.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    name_or_path: str = Field("tiny", description='"tiny" (built-in, offline), a local directory, or a hub id')
    trust_remote_code: bool = Field(False, description="run model code shipped with the weights; off unless asked")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights dtype; auto = bfloat16/float16 on CUDA, float32 on CPU"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory (+~30% compute)")
    attn_implementation: Literal["eager", "sdpa"] | None = Field(
        None, description="attention kernel; None = the library default for the model"
    )


class QuantSection(Section):
    load_in_4bit: bool = Field(False, description="QLoRA: load the frozen base in 4-bit with bitsandbytes")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the quantization constants too (~0.4 bit/param saved)")
    compute_dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class LoraSection(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: Literal["none", "all", "lora_only"] = "none"


class DataSection(Section):
    path: str | None = Field(None, description="JSON or JSONL dialogues; None = the bundled sample")
    max_seq_len: int = Field(256, gt=8, description="tokens per templated dialogue; longer ones are rejected, not cut")
    loss_on: Literal["bot", "all"] = Field("bot", description="train on bot turns only, or on the whole text")
    # A Literal, not a free string: a typo ("packing") must fail config loading, not fall back to padding.
    batching: Literal["padded", "packed"] = Field(
        "padded",
        description="padded: each batch padded to its longest dialogue; packed: several dialogues per row, "
        "position ids restarting per dialogue, no dialogue attending to another (checked on the model)",
    )
    train_frac: float = Field(0.8, gt=0.0, le=1.0)
    eval_cap: int = Field(100, ge=0, description="at most this many eval dialogues (eval cost grows with it)")
    split_seed: int = 42


class TrainSection(Section):
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant_with_warmup"] = "cosine"
    batch_size: int = Field(4, gt=0)
    eval_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="mixed precision; auto = bf16 where CUDA supports it, fp16 on older GPUs, fp32 on CPU"
    )
    eval_steps: int = Field(20, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(20, gt=0)
    logging_steps: int = Field(5, gt=0)
    sampling: Literal["random", "group_by_length"] = Field(
        "group_by_length", description="group similar lengths into batches so dynamic padding wastes little"
    )
    empty_cache_steps: int | None = Field(None, gt=0, description="release cached accelerator memory every N steps")
    trained_logits_only: bool = Field(
        True, description="compute the output head only where a trained token follows (same loss and gradients, "
        "checked on the model; with Gemma's 256,000-word head the step's largest tensor); false: at every position",
    )
    seed: int = 42


class StyleSection(Section):
    profile: str = Field("socrates", description="shipped profile name or a YAML path")
    eval_samples: int = Field(8, ge=0, description="eval prompts answered and scored at each evaluation")
    max_new_tokens: int = Field(48, gt=0, description="bound on each generated reply during training")


class RunSection(Section):
    output_dir: str = Field("runs/tiny", description="the run directory: config, split, checkpoints, model, metrics")


class Config(Section):
    preset: str = DEFAULT_PRESET
    model: ModelSection = Field(default_factory=ModelSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    style: StyleSection = Field(default_factory=StyleSection)
    run: RunSection = Field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, for ``training_config.json`` and ``config.yaml`` in the run directory."""
        return self.model_dump(mode="json")


def available_presets() -> list[str]:
    folder = resources.files("socratune") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: a config never needs them, and a few nested
    aliases ("billion laughs") expand into more values than memory holds once merged and checked."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a config",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from exc
    except RecursionError:
        raise ConfigError(f"{source}: not usable YAML: nested too deeply") from None
    except ValueError as exc:  # int(): a number of thousands of digits
        raise ConfigError(f"{source}: not usable YAML: {str(exc)[:80]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def read_yaml_file(path: Path, what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML file, or a ConfigError in one line naming the file: missing, not a
    regular file, unreadable, not UTF-8, not YAML, aliases, or not a mapping."""
    from .data import check_readable_file

    check_readable_file(path, what, ConfigError)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                          "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(os_error_message(exc, path, f"reading {what}")) from exc
    return _read_yaml(text, str(path))


def _preset_dict(name: str) -> dict[str, Any]:
    allowed = available_presets()
    if name not in allowed:
        raise ConfigError(f"unknown preset {quote_capped(name)}; allowed: {', '.join(allowed)}", key="preset",
                          allowed=allowed)
    text = (resources.files("socratune") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    return _read_yaml(text, f"preset {name}")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _allowed_keys(path: tuple[str | int, ...]) -> list[str]:
    """The keys allowed in the section that ``path`` (the bad key's location) points into."""
    model: type[BaseModel] = Config
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    first_key, first_allowed = None, None
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"])
            lines.append(f"{source}: unknown key {quote_capped(key)}; allowed: {', '.join(allowed)}")
        else:
            allowed = None  # pydantic's message already lists the allowed literals
            lines.append(f"{source}: '{quote_capped(key)}': {err['msg']} (got {quote_capped(err.get('input'))})")
        first_key = first_key or key
        first_allowed = first_allowed or allowed
    return ConfigError("\n".join(lines), key=first_key, allowed=first_allowed)


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    recorded: dict[str, Any] | None = None,
) -> Config:
    """Build the run config from a preset, an optional YAML file and dotted-key overrides.

    The preset is chosen by ``preset`` if given, else by the file's ``preset:`` key, else
    ``tiny``. ``recorded`` is the config an existing run directory was trained with: unless a
    preset is named, it replaces the preset as the bottom layer, so ``train --output RUN``
    continues with the values the run started with. Raises ConfigError naming the file, the bad
    key and the allowed values.
    """
    file_data: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        path = Path(path)
        source = str(path)
        file_data = read_yaml_file(path)
    named_preset = preset or file_data.get("preset")
    if recorded is not None and not named_preset:
        preset_name, base = recorded.get("preset", DEFAULT_PRESET), recorded
    else:
        preset_name = named_preset or DEFAULT_PRESET
        base = _preset_dict(str(preset_name))
    merged = _merge(base, file_data)
    merged = _merge(merged, _dotted_to_nested(overrides or {}))
    merged["preset"] = preset_name
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise _explain(exc, source) from exc


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """Re-read a config recorded in a run directory."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from exc


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), allow_unicode=True, sort_keys=False)
