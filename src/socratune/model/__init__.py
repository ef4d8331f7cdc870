"""Layer 2, the models: base models loaded (a directory, a hub id or the built-in tiny one),
4-bit quantization and LoRA, process memory, and export (merged, GGUF, Modelfile)."""
