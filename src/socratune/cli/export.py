"""``socratune export``: the adapter merged into its base, as a transformers folder and/or GGUF."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import ConfigError
from .common import quote

NAME = "export"
SUMMARY = "merge the adapter into the base: transformers directory and/or GGUF"
DESCRIPTION = "Give --merged, --gguf or both."
EXAMPLE = "socratune export runs/tiny --merged merged/ --gguf tiny.gguf"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (what `socratune train --output` wrote)")
    parser.add_argument("--merged", help="directory for the merged transformers model and tokenizer")
    parser.add_argument("--gguf", help="GGUF file for llama.cpp / Ollama (Llama-architecture models)")
    parser.add_argument("--checkpoint", help="export checkpoints/NAME (or a path) instead of the final adapter")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory or existing file")


def run(args: argparse.Namespace) -> int:
    from ..generation.generate import GenParams
    from ..model.export import export
    from ..model.modelfile import ollama_parameters

    if not args.merged and not args.gguf:
        raise ConfigError("nothing to export: give --merged OUT_DIR and/or --gguf OUT.gguf")
    serve_defaults = GenParams()  # what `socratune serve` answers with, so Ollama answers alike
    result = export(args.run_dir, merged_dir=args.merged, gguf_path=args.gguf, checkpoint=args.checkpoint,
                    force=args.force, ollama_parameters=ollama_parameters(
                        serve_defaults.max_new_tokens, serve_defaults.temperature, serve_defaults.top_p,
                        serve_defaults.repetition_penalty))
    for note in result.notes:
        print(note)
    if result.merged_dir:
        print(f"merged model ({result.dtype}) saved in {result.merged_dir}; load it with "
              f"AutoModelForCausalLM.from_pretrained({str(result.merged_dir)!r})")
    if result.gguf_path:
        print(f"GGUF ({result.gguf_type}) written to {result.gguf_path}")
    if result.modelfile:
        print(f"Ollama Modelfile written to {result.modelfile}; use it with: "
              f"ollama create {quote(Path(args.run_dir).resolve().name)} -f {quote(str(result.modelfile))}")
    return 0
