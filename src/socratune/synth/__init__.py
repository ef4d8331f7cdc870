"""``socratune synth``: Socratic training dialogues by self-play between two chat models, filtered.

    socratune synth --output data.jsonl --url http://127.0.0.1:8000/v1 --model my-model --dialogues 500

``synth()`` follows these steps:

1. Profile: the synth profile (``assets/synth_socrates.yaml`` or ``--config FILE``) holds what
   varies between dialogues as data: opening questions, student personas, the Socrates system
   prompt, the student prompt template, per-role temperature and max_tokens, filter thresholds
   and prices.
2. Plan: dialogue ``i`` gets its question and persona from ``random.Random(f"{seed}:{i}")`` and
   its request seeds from ``(seed, i, step)``, so a resumed run regenerates the same plan and the
   same command makes the same choices.
3. Resume: the kept file (``OUT``) and the rejects (``OUT.rejected.jsonl``, beside it) each carry
   the dialogue index of every line; the indices found there are done, the rest are generated. A
   torn last line (a kill mid-write) is cut off first. ``OUT.synth/`` holds the run's lock (the
   run-directory lock of ``rundir.py``) and ``run.json``: every argument (never a key), the
   profile's hash, the endpoints, each start; a resume with a different seed, turn count,
   profile or model is refused.
4. Converse: ``concurrency`` dialogues at a time in a thread pool. The student opens with the
   planned question; Socrates (its system prompt + the conversation) answers; the student (its
   persona prompt + the transcript so far) speaks again; ``turns`` exchanges in all.
5. Filter: every Socrates reply is scored by the style scorer against the message it answers
   (and with ``--judge`` rated by the LLM judge); a dialogue whose mean scores reach the
   profile's thresholds is kept unless it is a near-duplicate (character-shingle Jaccard
   similarity, candidates found by MinHash) of a kept one or of a ``--dedupe-against`` file.
6. Write: each finished dialogue is appended to OUT or OUT.rejected.jsonl (with its reason),
   flushed and fsynced, one by one. Kept lines are socratune's data format (``messages`` with
   alternating user/assistant turns ending on the assistant, non-empty) plus ``meta``.

Failures: an endpoint that is down at the start raises ``EndpointUnreachable`` before anything
is written; one that stops answering mid-run (after the client's retries) ends the run with
``EndpointLost`` once the dialogues in flight are settled: all finished ones are on disk and the
same command resumes. Ctrl-C drops the dialogues in flight (nothing half-written) and raises
``SynthInterrupted``.

The package: ``profile.py`` (the synth profile's schema and the seeded plan), ``conversation.py``
(one dialogue between the two roles), ``dedupe.py`` (near-duplicate search), ``run.py`` (files,
resume, the filter, the thread pool, the summary).

Tests: ``pytest tests/test_synth.py``.
"""

from .conversation import Conversation, converse, strip_speaker
from .dedupe import NearDuplicates, dialogue_text
from .profile import (
    Persona,
    SynthProfile,
    load_synth_profile,
    plan_dialogue,
    request_seed,
)
from .run import (
    KEY_VARIABLES,
    Progress,
    SynthPaths,
    SynthRequest,
    summarize,
    synth,
    synth_status,
)

__all__ = ["KEY_VARIABLES", "Conversation", "NearDuplicates", "Persona", "Progress", "SynthPaths", "SynthProfile",
           "SynthRequest", "converse", "dialogue_text", "load_synth_profile", "plan_dialogue", "request_seed",
           "strip_speaker", "summarize", "synth", "synth_status"]
