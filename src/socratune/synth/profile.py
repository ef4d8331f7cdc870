"""The synth profile: what varies between generated dialogues, as data (questions, personas,
prompts, per-role sampling, filter thresholds, prices), and the seeded plan that picks a question
and a persona per dialogue index. Layer 0: pydantic and YAML only.
"""

from __future__ import annotations

import hashlib
import random
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.config import read_yaml_file
from ..core.errors import ConfigError

AXES_AND_OVERALL = ("tone", "approach", "format", "logic", "overall")


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN or infinite temperature, threshold or price is a typo, not a setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RoleSpec(_Strict):
    system_prompt: str = Field(min_length=1)
    temperature: float = Field(ge=0, le=2)
    max_tokens: int = Field(gt=0)


class StudentSpec(_Strict):
    system_prompt_template: str = Field(min_length=1)  # {name} {age} {occupation} {stance} {speech}
    temperature: float = Field(ge=0, le=2)
    max_tokens: int = Field(gt=0)


class Persona(_Strict):
    name: str
    age: int = Field(gt=0, lt=150)
    occupation: str
    stance: str
    speech: str


class FilterSpec(_Strict):
    min_overall: float = Field(ge=0, le=4)
    min_axis: dict[str, float] = Field(default_factory=dict)
    min_judge: float = Field(default=0.0, ge=0, le=4)
    near_duplicate: float = Field(gt=0, le=1)  # Jaccard similarity at or above which two dialogues are one
    shingle_chars: int = Field(default=5, gt=0)


class Prices(_Strict):
    prompt_per_million: float | None = Field(default=None, ge=0)
    completion_per_million: float | None = Field(default=None, ge=0)


class SynthProfile(_Strict):
    name: str
    socrates: RoleSpec
    student: StudentSpec
    personas: list[Persona] = Field(min_length=1)
    questions: list[str] = Field(min_length=1)
    filter: FilterSpec
    prices: Prices = Prices()


def load_synth_profile(path: str | Path | None = None) -> tuple[SynthProfile, str, str]:
    """``(profile, sha256 of its text, where it came from)``; the bundled one when ``path`` is None."""
    if path is None:
        text = resources.files("socratune").joinpath("assets/synth_socrates.yaml").read_text(encoding="utf-8")
        source = "bundled:synth_socrates.yaml"
    else:
        # Read as any config is: a FIFO, non-UTF-8 text, aliases, deep nesting and huge integers are
        # one-line ConfigErrors naming the file, before any request is made.
        try:
            raw = read_yaml_file(Path(path), "synth profile")
        except ConfigError as exc:
            raise ConfigError(str(exc), key="--config") from None
        text = Path(path).read_text(encoding="utf-8")  # hashed below: a resume must use the same profile
        source = str(path)
    try:
        if path is None:
            raw = yaml.safe_load(text)
        profile = SynthProfile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = (".".join(str(p) for p in first["loc"]) or "(top level)")[:80]
        raise ConfigError(f"synth profile {source}: {where}: {first['msg'][:200]}", key=where) from None
    unknown = set(profile.filter.min_axis) - set(AXES_AND_OVERALL[:-1])
    if unknown:
        raise ConfigError(f"synth profile {source}: filter.min_axis has unknown axis {sorted(unknown)}",
                          key="filter.min_axis", allowed=list(AXES_AND_OVERALL[:-1]))
    for persona in profile.personas:
        try:
            profile.student.system_prompt_template.format(**persona.model_dump())
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"synth profile {source}: student.system_prompt_template uses {exc}; the persona "
                              f"fields are {list(Persona.model_fields)}",
                              key="student.system_prompt_template") from None
    return profile, hashlib.sha256(text.encode("utf-8")).hexdigest(), source


def plan_dialogue(profile: SynthProfile, seed: int, index: int) -> tuple[str, Persona]:
    """The opening question and student persona of dialogue ``index``: the same for the same seed."""
    rng = random.Random(f"{seed}:{index}")
    return rng.choice(profile.questions), rng.choice(profile.personas)


def request_seed(seed: int, index: int, step: int) -> int:
    """A sampling seed per request, so a seeded server repeats a dialogue on a rerun."""
    digest = hashlib.sha256(f"{seed}:{index}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
