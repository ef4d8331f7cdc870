"""What several commands share: the config from flags, the config and generation flags, generation
settings checked, quoting for the commands they print."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError


def config_from_args(args: argparse.Namespace, continue_run: bool = False):
    """The config from preset, ``--config``, ``--set`` and flags; with ``continue_run``, an existing run
    directory's recorded config replaces the preset underneath, so ``train --output RUN`` resumes
    with the settings the run started with."""
    from ..core.config import load_config

    overrides: dict[str, Any] = {}
    if args.model:
        # A local directory is recorded absolute, so the run finds its base from any directory.
        local = Path(args.model).expanduser()
        overrides["model.name_or_path"] = str(local.resolve()) if local.is_dir() else args.model
    if args.data:
        # Absolute, so the run resumes from any directory; not resolve(), which raises on a symlink loop
        # that the data loader reports in words.
        overrides["data.path"] = os.path.abspath(args.data)
    if getattr(args, "output", None):
        overrides["run.output_dir"] = args.output
    if getattr(args, "epochs", None) is not None:
        overrides["train.epochs"] = args.epochs
    overrides.update(preference_overrides(args))
    assignments = getattr(args, "set", None)
    config = load_config(args.config, args.preset, overrides, assignments=assignments)
    if continue_run:
        from ..core.rundir import RunDir
        from ..training.resume import read_recorded_config

        recorded = read_recorded_config(RunDir(config.run.output_dir))
        if recorded is None and config.prefs.from_run:  # a new preference run starts from its supervised run's settings
            recorded = read_recorded_config(RunDir(config.prefs.from_run))
        if recorded is not None:
            config = load_config(args.config, args.preset, overrides, recorded=recorded, assignments=assignments)
    return config


def preference_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``train --method / --pairs / --from``: dotted config keys (paths made absolute, so the run resumes anywhere)."""
    overrides: dict[str, Any] = {}
    if getattr(args, "method", None):
        overrides["train.method"] = args.method
    if getattr(args, "pairs", None):
        overrides["prefs.pairs"] = os.path.abspath(args.pairs)
    if getattr(args, "from_run", None):
        overrides["prefs.from_run"] = os.path.abspath(args.from_run)
    return overrides


def quote(text: str) -> str:
    return shlex.quote(text)


def resume_command(run_dir: str) -> str:
    """``socratune train --output RUN``: the run's recorded config supplies everything else."""
    return f"socratune train --output {quote(run_dir)}"


def gen_params(args: argparse.Namespace):
    """Generation settings from the flags; ``--seed`` seeds torch here, once, for sampled replies."""
    from ..generation.generate import MIN_DIVISOR, GenParams

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    # Sampling divides logits by these: a tiny or infinite one turns them into inf/nan.
    if not (args.temperature == 0 or MIN_DIVISOR <= args.temperature < float("inf")):
        raise ConfigError(f"--temperature must be 0 (greedy) or a number from {MIN_DIVISOR}, not {args.temperature}")
    if not MIN_DIVISOR <= args.repetition_penalty < float("inf"):
        raise ConfigError(f"--repetition-penalty must be a number from {MIN_DIVISOR}, not {args.repetition_penalty}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be above 0 and at most 1, not {args.top_p}")
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    return GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     repetition_penalty=args.repetition_penalty)


def profile_names() -> list[str]:
    """Shipped style profiles, read from the package folder (no scorer import for --help)."""
    from importlib import resources

    folder = resources.files("socratune") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_names() -> list[str]:
    from ..core.config import available_presets

    return available_presets()


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see `socratune config`)")
    parser.add_argument("--preset", help=f"preset to start from: {', '.join(preset_names())} "
                                         "(default: the config file's preset:, else tiny)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="set one config key, in the YAML's dotted form (train.epochs=5, "
                             "lora.target_modules=[q_proj,v_proj]); repeatable; over --config and --preset, "
                             "under the named flags such as --epochs")
    parser.add_argument("--model", help='"tiny", a local model directory, or a hub id (model.name_or_path)')


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="use checkpoints/NAME (or a path) instead of the final adapter")
    parser.add_argument("--base", action="store_true", help="the untuned base model, for comparison")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of "
                                                                 "tokens whose probabilities sum to this")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = none; >1 discourages repeats")
    parser.add_argument("--seed", type=int, help="seed for sampled replies (temperature > 0)")
