"""socratune: turn Japanese dialogue data into a Socratic chatbot by LoRA or QLoRA fine-tuning.

Code map, in pipeline order. A module imports only from its own layer or lower ones. Layers 0-1
import no torch or transformers when imported (tests/test_layers.py checks every module but the
five of layer 3); layer 2 loads them inside the functions that need them.

Layer 0: names, settings, files (no deep-learning stack)
  errors.py       SocratuneError and its kinds; every message names the file, row or key
  scores.py       the style score keys (four axes + overall), written once
  config.py       typed config sections from YAML, presets underneath, CLI flags on top
  rundir.py       a run's file names, atomic writes, the writer lock, checkpoint manifests
  data.py         loading and validating dialogues (JSON / JSONL)
  split.py        the seeded train/eval split, persisted and verified
  style.py        the style scorer and its YAML profiles (becoming style/: profile, scorer, calibrate)

Layer 1: from text to training examples and run decisions (still no torch at import)
  template.py     chat templating and label masks: which tokens are trained
  synth.py        synthesizing dialogues through a model endpoint (client.py: the `openai` client)
  prefs.py        preference pairs for DPO / ORPO
  resume.py       new / resume / finished, decided from the files on disk; the config guard
  selection.py    which step becomes the final adapter (train.select)
  distributed.py  several processes, one run (torchrun / accelerate launch)
  memory.py       process and accelerator memory
  plots.py        training plots from metrics.csv; save_figure for every plot
  tiny.py         the built-in offline tiny model

Layer 2: models (torch and transformers loaded when called)
  modeling.py     base models, 4-bit quantization, LoRA, loading a run for inference
  examples.py     a config's data loaded, validated and tokenized with its tokenizer; reply prompts;
                  supervised training's data steps and TrainingData, what any method's data step yields
  packing.py      padding-free batching
  generate.py     reply generation (batched, streamed)

Layer 3: training (imports transformers at the top)
  train.py        THE recipe: train(config), read top to bottom, for every train.method (METHODS
                  names the few steps where methods differ)
  hf_trainer.py   the transformers Trainer as configured here: arguments, one subclass, summary
  preference.py   DPO / ORPO: the pairs' data steps, the supervised adapter continued, the losses
                  and their Trainer, reference log-probs, the preference metrics
  callbacks.py    style monitoring, metrics, checkpoints (manifests, rotation, best step), signals
  progress.py     the progress bar / line with the time left (a Trainer callback)

Layer 4: using a trained run
  evaluate.py     running base / checkpoints / tuned on held-out prompts
  report.py       the evaluation's statistics, plots and report.md: pure functions over records
  judge.py        an LLM judge through an OpenAI-compatible endpoint
  chat.py, serve.py, export.py   terminal chat, the OpenAI-compatible API + chat page, merged / GGUF export

Layer 5: the command line
  cli.py          parses arguments, calls the library, prints, chooses exit codes
"""

__version__ = "0.1.0"
