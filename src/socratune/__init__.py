"""socratune: turn Japanese dialogue data into a Socratic chatbot by LoRA or QLoRA fine-tuning.

Code map: one folder per stage of the pipeline, listed by layer. A module imports only from its
own layer or lower ones, there is no import cycle, no module passes 500 lines and no function 80
(tests/test_layers.py checks all of it). No module imports torch or transformers when imported
but the five of the training recipe and its Trainer (train, hf_trainer, callbacks, preference,
progress), which load only when training runs; the others import them inside the functions.

core/        layer 0: names, settings, files (no deep-learning stack)
  errors.py       SocratuneError and its kinds; every message names the file, row or key
  scores.py       the style score keys (four axes + overall), written once
  config.py       typed config sections from YAML, presets underneath, CLI flags on top
  rundir.py       a run's file names, atomic writes, the writer lock, checkpoint manifests
  quiet.py        library messages that say nothing to a user, silenced by what they say

data/        layer 1: from files to training text
  dialogues.py    loading and validating dialogues (JSON / JSONL)
  split.py        the seeded train/eval split, persisted and verified
  template.py     chat templating and label masks: which tokens are trained
  packing.py      padding-free batching

style/       layer 1: the style scorer and its YAML profiles: profile, morphology, one module per
             axis or measurement family (format, tone, approach, logic, grammar), scorer, calibrate

model/       layer 2: models (torch and transformers loaded when called)
  modeling.py     base models, 4-bit quantization, LoRA, loading a run for inference
  tiny.py         the built-in offline tiny model
  memory.py       process and accelerator memory
  export.py       the adapter merged into its base: transformers folder, GGUF
  modelfile.py    the Ollama Modelfile beside a GGUF: the chat template in Go, stops, sampling

generation/  layer 2: replies from a model
  generate.py     reply generation (batched, streamed), sampling settings, stop strings
  whole_chars.py  decoding that never ends inside a character
  batching.py     continuous batching: many replies decoded together, each with its own settings (serve)

training/    layer 3: training
  train.py        THE recipe: train(config), read top to bottom, for every train.method (METHODS
                  names the few steps where methods differ)
  jobs.py         Method, FitJob and BuiltModel: what the recipe hands a method, below both methods
  examples.py     a config's data loaded, validated and tokenized; supervised training's data steps
  hf_trainer.py   the transformers Trainer as configured here: arguments, one subclass, summary
  preference.py   DPO / ORPO: the pairs' data steps, the supervised adapter continued, the losses
                  and their Trainer, reference log-probs, the preference metrics
  prefs.py        preference pairs: read, split, and sampled from a run's own replies
  callbacks.py    style monitoring, metrics, checkpoints (manifests, rotation, best step), signals
  progress.py     the progress bar / line with the time left (a Trainer callback)
  plots.py        training plots from metrics.csv; save_figure for every plot
  resume.py       new / resume / finished, decided from the files on disk; the config guard
  selection.py    which step becomes the final adapter (train.select)
  distributed.py  several processes, one run (torchrun / accelerate launch)

synth/       layer 4: dialogues synthesized by self-play through a model endpoint (client.py:
             the `openai` client, which the judge uses too)

evaluation/  layer 4: judging a trained run
  evaluate.py     running base / checkpoints / tuned on held-out prompts
  report.py       the evaluation's statistics, plots and report.md: pure functions over records
  judge.py        an LLM judge through an OpenAI-compatible endpoint

serving/     layer 4: using a trained run live
  schema.py, engine.py, app.py, server.py   the OpenAI-compatible API + chat page
  chat.py         terminal chat

cli/         layer 5: the command line, one module per command (add_arguments, run);
             __init__.py composes the parser and turns errors into exit codes
"""

__version__ = "0.1.0"
