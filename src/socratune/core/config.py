"""Typed run configuration: one YAML file per run, presets underneath, CLI flags on top.

A config is built in four layers, each overriding the one before:

1. a preset shipped in ``socratune/presets/`` (``tiny`` unless another is named),
2. the user's YAML file (which may name its own ``preset:``),
3. ``--set KEY=VALUE`` assignments from the command line, in the YAML's dotted keys,
4. the named flags (``--model``, ``--epochs``...), given as dotted keys (``{"model.name_or_path": "..."}``).

Every section forbids unknown keys, so a typo is an error that names the key and the keys
allowed there, never a silently ignored setting. Only ``training/train.py`` and ``cli/`` see the whole
config; components take plain arguments.
"""

from __future__ import annotations

import textwrap
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError, check_readable_file, os_error_message, quote_capped

DEFAULT_PRESET = "tiny"

# What a preference run (train.method dpo / orpo) starts from, laid over the supervised settings
# it continues (model, LoRA, data): a short, gentle continuation, not a second supervised
# schedule (the tiny preset's 20 epochs at 2e-3 over-optimised DPO: held-out pair loss 3.6 -> 8.8).
# The DPO recipe is the one that won issue 16's proof (benchmarks/RESULTS.md, "Preference tuning");
# a user's YAML, --set and flags override any of it.
PREFERENCE_SCHEDULE: dict[str, Any] = {
    "train": {"epochs": 2, "learning_rate": 5.0e-4, "warmup_ratio": 0.1, "batch_size": 8,
              "eval_steps": 15, "save_steps": 30, "logging_steps": 5},
    "prefs": {"eval_frac": 0.1},
}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # β 0.3, not 0.1: at 0.1 the supervised eval loss drifted +15% in the proof
    "dpo": {**PREFERENCE_SCHEDULE, "prefs": {**PREFERENCE_SCHEDULE["prefs"], "beta": 0.3}},
    "orpo": PREFERENCE_SCHEDULE,  # no reference to drift from; its β weighs the odds-ratio term
}


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
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit number format; nf4 suits normally distributed weights")
    double_quant: bool = Field(True, description="quantize the quantization constants too (~0.4 bit/param saved)")
    compute_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype the 4-bit weights are dequantized to for each matmul (float32 on a CPU)"
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, description="LoRA rank: size of the low-rank update per adapted matrix")
    alpha: int = Field(32, gt=0, description="LoRA scaling; the update is multiplied by alpha / r")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the adapter's input while training")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="names of the modules that get an adapter (last part of the name)")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases are trained as well")


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
    train_frac: float = Field(0.8, gt=0.0, le=1.0,
                              description="share of dialogue groups that go to training; the rest is held out")
    eval_cap: int = Field(100, ge=0, description="at most this many eval dialogues (eval cost grows with it)")
    split_seed: int = Field(42, description="seed of the train/eval split (kept for the life of a run)")


class TrainSection(Section):
    epochs: float = Field(3.0, gt=0, description="passes over the training dialogues (fractions allowed)")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate of the adapter (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of the steps spent ramping the learning rate up")
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warmup"
    )
    batch_size: int = Field(4, gt=0, description="training dialogues per step and process")
    eval_batch_size: int = Field(8, gt=0, description="dialogues per forward pass when computing eval loss")
    grad_accum: int = Field(1, gt=0, description="steps whose gradients are summed before one update "
                            "(effective batch = batch_size x grad_accum x processes)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 = no clipping")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="mixed precision; auto = bf16 where CUDA supports it, fp16 on older GPUs, fp32 on CPU"
    )
    eval_steps: int = Field(20, gt=0, description="evaluate eval loss and style every N optimizer steps")
    save_steps: int = Field(100, gt=0, description="write a resumable checkpoint every N optimizer steps")
    save_total_limit: int = Field(20, gt=0, description="checkpoints kept; older ones are deleted")
    logging_steps: int = Field(5, gt=0, description="log training loss every N optimizer steps")
    sampling: Literal["random", "group_by_length"] = Field(
        "group_by_length", description="group similar lengths into batches so dynamic padding wastes little"
    )
    empty_cache_steps: int | None = Field(None, gt=0, description="release cached accelerator memory every N steps")
    trained_logits_only: bool = Field(
        True, description="compute the output head only where a trained token follows (same loss and gradients, "
        "checked on the model; with Gemma's 256,000-word head the step's largest tensor); false: at every position",
    )
    select: Literal["best_eval_loss", "best_style", "last"] = Field(
        "best_eval_loss", description="which step's weights become the final adapter: the lowest eval loss "
        "(default: the least noisy signal), the highest style score (noisy: few generated replies), or the last step",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="stop when this many evaluations in a row have not improved on the best by "
        "train.select (eval loss or style score); unset: train every step. Preference runs keep their last step "
        "and never stop early (docs/selection.md)",
    )
    seed: int = Field(42, description="seed of adapter initialisation, batch order and dropout")
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="sft: supervised on dialogues; dpo / orpo: preference tuning on the pairs in prefs.pairs, "
        "continuing from the supervised run prefs.from_run (see docs/prefs.md)",
    )


    @field_validator("early_stopping_patience")
    @classmethod
    def _patience_needs_a_metric(cls, patience: int | None, info: ValidationInfo) -> int | None:
        if patience is not None and info.data.get("select") == "last":
            raise ValueError("early stopping watches the train.select metric, and train.select is 'last': set "
                             "train.select to best_eval_loss or best_style, or train.early_stopping_patience to null")
        return patience


class StyleSection(Section):
    profile: str = Field("socrates", description="shipped profile name or a YAML path")
    eval_samples: int = Field(8, ge=0, description="eval prompts answered and scored at each evaluation")
    max_new_tokens: int = Field(48, gt=0, description="bound on each generated reply during training")


class PrefsSection(Section):
    """Preference tuning: making pairs (``socratune prefs``) and training on them (``train --method dpo|orpo``)."""

    pairs: str | None = Field(None, description="JSONL pairs file written by socratune prefs; needed by dpo / orpo")
    from_run: str | None = Field(None, description="the supervised run whose final adapter preference tuning starts "
                                 "from (and, for dpo, the reference policy)")
    beta: float = Field(0.1, gt=0, description="dpo: strength of the KL anchor to the reference; orpo: weight "
                        "of the odds-ratio term beside the chosen reply's NLL")
    sft_weight: float = Field(1.0, ge=0, description="dpo: weight of the chosen replies' token-mean NLL added to "
                              "the loss (RPO; TRL's rpo_alpha), which keeps them likely while the margin grows; "
                              "0 = plain DPO, which drifted and lost on every axis in benchmarks/RESULTS.md "
                              "(orpo always has it, at 1)")
    eval_frac: float = Field(0.1, ge=0.0, lt=1.0, description="share of prompts whose pairs are held out for eval")
    split_seed: int = Field(42, description="seed of the train / eval split of the pairs (by prompt)")
    samples: int = Field(6, ge=2, description="socratune prefs: replies sampled per prompt")
    temperature: float = Field(0.7, gt=0, description="socratune prefs: sampling temperature (0.7 beat 1.0 in "
                               "benchmarks/RESULTS.md: replies nearer the greedy ones the model is used with)")
    top_p: float = Field(0.95, gt=0, le=1, description="socratune prefs: nucleus sampling mass")
    max_new_tokens: int = Field(128, gt=0, description="socratune prefs: bound on each sampled reply (128 = "
                                "evaluate's default, so pairs cover the lengths evaluation sees)")
    min_margin: float = Field(0.25, ge=0, description="socratune prefs: pairs whose ranking scores differ by less "
                              "are dropped (scores are 0-4)")
    weights: dict[Literal["tone", "approach", "format", "logic"], float] | None = Field(
        None, description="socratune prefs: ranking weight per style axis; None = the profile's overall_weights")


class RunSection(Section):
    output_dir: str = Field("runs/tiny", description="the run directory: config, split, checkpoints, model, metrics")


class Config(Section):
    preset: str = Field(DEFAULT_PRESET,
                        description="preset the other values start from (socratune config --preset NAME)")
    model: ModelSection = Field(default_factory=ModelSection, description="the base model and how it is loaded")
    quant: QuantSection = Field(default_factory=QuantSection,
                                description="4-bit quantization of the frozen base (QLoRA)")
    lora: LoraSection = Field(default_factory=LoraSection, description="the trained low-rank adapter")
    data: DataSection = Field(default_factory=DataSection,
                              description="the dialogues, their templating and the train/eval split")
    train: TrainSection = Field(default_factory=TrainSection,
                                description="optimizer, schedule, batches, evaluation and checkpoint cadence")
    style: StyleSection = Field(default_factory=StyleSection,
                                description="the Socratic style monitor run at each evaluation")
    prefs: PrefsSection = Field(default_factory=PrefsSection,
                                description="preference pairs and DPO / ORPO training (train.method)")
    run: RunSection = Field(default_factory=RunSection, description="where the run lives")

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


def _explain(exc: ValidationError, source: str, assigned: dict[str, str] | None = None) -> ConfigError:
    """One line per problem, naming where the bad value came from: ``assigned`` maps dotted keys
    given on the command line to how they were given (``--set train.epochs=x``), else ``source``."""
    lines = []
    first_key, first_allowed = None, None
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        origin = _origin(key, assigned or {}, source)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"])
            lines.append(f"{origin}: unknown key {quote_capped(key)}; allowed: {', '.join(allowed)}")
        else:
            allowed = None  # pydantic's message already lists the allowed literals
            lines.append(f"{origin}: {quote_capped(key)}: {err['msg']} (got {quote_capped(err.get('input'))})")
        first_key = first_key or key
        first_allowed = first_allowed or allowed
    return ConfigError("\n".join(lines), key=first_key, allowed=first_allowed)


def _origin(key: str, assigned: dict[str, str], source: str) -> str:
    """The command-line assignment that set ``key`` (or a section or list holding it), else ``source``."""
    for dotted, given in assigned.items():
        if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
            return given
    return source


def parse_assignments(assignments: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=5", "lora.target_modules=[q_proj, v_proj]"]`` as dotted-key overrides.

    Each value is read as a YAML value, so it takes the type it would have in the config file
    (``5`` a number, ``true`` a boolean, ``null`` none, ``[a, b]`` a list); the keys are checked
    when the config is built, with the same messages as a file's keys.
    """
    parsed: dict[str, Any] = {}
    for assignment in assignments or []:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {quote_capped(assignment)}: expected KEY=VALUE with a dotted key, "
                              "e.g. --set train.epochs=5", key=quote_capped(key) if key else None)
        try:
            parsed[key] = yaml.load(text, Loader=_NoAliasLoader) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {quote_capped(key)}: the value {quote_capped(text)} is not a valid YAML value: "
                              f"{_yaml_problem(exc)}", key=quote_capped(key)) from exc
        except (RecursionError, ValueError):  # nested too deeply; a number of thousands of digits
            raise ConfigError(f"--set {quote_capped(key)}: the value {quote_capped(text)} is not usable",
                              key=quote_capped(key)) from None
    return parsed


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    recorded: dict[str, Any] | None = None,
    assignments: list[str] | None = None,
) -> Config:
    """Build the run config from a preset, an optional YAML file, ``--set`` assignments and
    dotted-key overrides, each layer above the one before.

    The preset is chosen by ``preset`` if given, else by the file's ``preset:`` key, else
    ``tiny``. ``recorded`` is the config an existing run directory was trained with: unless a
    preset is named, it replaces the preset as the bottom layer, so ``train --output RUN``
    continues with the values the run started with. ``assignments`` are ``KEY=VALUE`` strings
    (``--set``); ``overrides`` (the named flags such as ``--epochs``) win over them. Raises
    ConfigError naming the file or ``--set``, the bad key and the allowed values.

    A preference method asked for on top of supervised settings (a preset, or the supervised run
    that ``prefs.from_run`` continues) brings its own defaults (``METHOD_DEFAULTS``) between
    those settings and the user's layers; a preference run's own recorded config already has them.
    """
    file_data: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        path = Path(path)
        source = str(path)
        file_data = read_yaml_file(path)
    assigned = parse_assignments(assignments)
    named_preset = preset or file_data.get("preset") or assigned.get("preset")
    if recorded is not None and not named_preset:
        preset_name, base = recorded.get("preset", DEFAULT_PRESET), recorded
    else:
        preset_name = named_preset or DEFAULT_PRESET
        base = _preset_dict(str(preset_name))
    users = _merge(_merge(file_data, _dotted_to_nested(assigned)), _dotted_to_nested(overrides or {}))
    base_method = (base.get("train") or {}).get("method", "sft")
    asked = users.get("train")
    method = asked.get("method", base_method) if isinstance(asked, dict) else base_method
    if base_method == "sft" and method in METHOD_DEFAULTS:
        base = _merge(base, METHOD_DEFAULTS[method])
    merged = _merge(base, users)
    merged["preset"] = preset_name
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        given = {key: f"--set {quote_capped(key)[1:-1]}={quote_capped(value)}" for key, value in assigned.items()}
        raise _explain(exc, source, given) from exc


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """Re-read a config recorded in a run directory."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from exc


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), allow_unicode=True, sort_keys=False)


def commented_yaml(config: Config) -> str:
    """The config as YAML with each key's description as a comment above it; read back with
    ``--config`` it gives the same config."""
    lines = [f"# socratune config (preset {config.preset}); each key's meaning is in the comment above it"]

    def emit(model: BaseModel, indent: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            for comment in textwrap.wrap(field.description or "", 96 - len(indent)):
                lines.append(f"{indent}# {comment}")
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{name}:")
                emit(value, indent + "  ")
            else:
                dumped = yaml.safe_dump(value, allow_unicode=True, default_flow_style=True, width=10**6)
                lines.append(f"{indent}{name}: {dumped.removesuffix(chr(10)).removesuffix('...').strip()}")

    emit(config, "")
    return "\n".join(lines) + "\n"
