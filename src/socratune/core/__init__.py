"""Layer 0, the small core every stage stands on: the config, the errors, the run directory's
files, the style score keys and the library-noise filter. Nothing here imports torch or
transformers, so ``socratune --help``, config checks and ``status`` stay instant."""
