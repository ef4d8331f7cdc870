"""An Ollama ``Modelfile`` for an exported GGUF: the run's chat template in Ollama's Go-template
syntax, its stop tokens, and ``socratune serve``'s default sampling, so ``ollama create`` gives a
model that is prompted exactly as socratune prompts it.

The template is not translated from Jinja by hand: the run's own chat template renders probe
conversations whose contents are unique markers, and what surrounds each marker is the text
that wraps a turn of that role (``TurnWrappers``). A template that does not wrap each turn the
same way wherever it falls (one that numbers turns, say) fails the check that the wrappers
rebuild every probe, and is refused with a message rather than written wrong.

    ollama create tiny -f exports/tiny.Modelfile && ollama run tiny
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..data.template import SYSTEM_FOLD_SEPARATOR, render, supports_system_role

# Markers that no chat template writes itself: each probe turn's content.
_MARK = "\u2063{}\u2063"


@dataclass(frozen=True)
class TurnWrappers:
    """The text a chat template puts around each turn, and around the conversation."""

    head: str  # before the first turn (e.g. "<bos>")
    user: tuple[str, str]
    assistant: tuple[str, str]
    system: tuple[str, str] | None  # None: the template has no system role; socratune folds it into the first user turn
    generation_prompt: str  # after the last user turn, where the reply begins

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt these wrappers give, as Ollama renders ``go_template``: the reference the
        probes are checked against (tests compare it with the tokenizer's own template)."""
        text, pending_system = self.head, ""
        for index, message in enumerate(messages):
            last = index == len(messages) - 1
            if message["role"] == "system" and self.system is None:
                pending_system = message["content"] + SYSTEM_FOLD_SEPARATOR
                continue
            before, after = {"user": self.user, "assistant": self.assistant, "system": self.system}[message["role"]]
            content = message["content"]
            if message["role"] == "user":
                content, pending_system = pending_system + content, ""
            text += before + content
            if not (last and message["role"] == "assistant"):  # a last assistant turn is a prefill: left open
                text += after
            if last and message["role"] == "user":
                text += self.generation_prompt
        return text


def _between(text: str, start: str, end: str | None = None) -> str:
    tail = text.split(start, 1)[1]
    return tail if end is None else tail.split(end, 1)[0]


def turn_wrappers(tokenizer: Any) -> TurnWrappers:
    """Read the wrappers off the tokenizer's chat template, and check that they rebuild it.

    Raises ConfigError when the template has no fixed per-turn shape."""
    u1, a1, u2, s = (_MARK.format(name) for name in ("u1", "a1", "u2", "s"))
    one = render(tokenizer, [{"role": "user", "content": u1}])
    two = render(tokenizer, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}])
    three = render(tokenizer, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                {"role": "user", "content": u2}])
    asking = render(tokenizer, [{"role": "user", "content": u1}], add_generation_prompt=True)
    if not (two.startswith(one) and three.startswith(two) and asking.startswith(one)):
        raise _refusal("a later turn changes how the earlier ones are written")
    user_turn, assistant_turn = three[len(two):], two[len(one):]
    user = (user_turn.split(u2)[0], _between(user_turn, u2))
    assistant = (assistant_turn.split(a1)[0], _between(assistant_turn, a1))
    head = one[: len(one) - len(user[0] + u1 + user[1])]
    system = None
    if supports_system_role(tokenizer):
        with_system = render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u1}])
        system = (with_system[len(head):].split(s)[0], _between(with_system, s, user[0] + u1))
    wrappers = TurnWrappers(head, user, assistant, system, asking[len(one):])
    probes = [[{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2},
               {"role": "assistant", "content": a1}, {"role": "user", "content": u1}]]
    for probe in probes:
        if wrappers.render(probe) != render(tokenizer, probe, add_generation_prompt=True):
            raise _refusal("its turns are not wrapped the same way wherever they fall")
    return wrappers


def _refusal(why: str) -> ConfigError:
    return ConfigError(f"no Modelfile: the run's chat template cannot be written as an Ollama TEMPLATE ({why}); "
                       "write its TEMPLATE by hand (docs/serve.md, Ollama)")


def _go_text(text: str) -> str:
    """Literal text inside a Go template: ``{{`` would open an action, so it is written as one."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(w: TurnWrappers) -> str:
    """``TurnWrappers`` as an Ollama TEMPLATE, over ``.Messages`` (a system message is folded into
    the first user turn when the template has no system role, as socratune does)."""
    ub, ua = map(_go_text, w.user)
    ab, aa = map(_go_text, w.assistant)
    if w.system is None:
        system_case = '{{ if eq .Role "system" }}{{ $system = .Content }}'
        user_content = ('{{ if $system }}{{ $system }}' + _go_text(SYSTEM_FOLD_SEPARATOR)
                        + '{{ $system = "" }}{{ end }}{{ .Content }}')
    else:
        sb, sa = map(_go_text, w.system)
        system_case = f'{{{{ if eq .Role "system" }}}}{sb}{{{{ .Content }}}}{sa}'
        user_content = "{{ .Content }}"
    return (
        f'{_go_text(w.head)}{{{{ $system := "" }}}}{{{{ range $i, $_ := .Messages }}}}'
        "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f"{system_case}"
        f'{{{{ else if eq .Role "user" }}}}{ub}{user_content}{ua}'
        f"{{{{ if $last }}}}{_go_text(w.generation_prompt)}{{{{ end }}}}"
        f'{{{{ else if eq .Role "assistant" }}}}{ab}{{{{ .Content }}}}{{{{ if not $last }}}}{aa}{{{{ end }}}}'
        "{{ end }}{{ end }}"
    )


def stop_strings(tokenizer: Any, generation_config: Any) -> list[str]:
    """The tokens that end a reply: the generation config's end-of-turn ids and the EOS token."""
    eos = generation_config.eos_token_id
    ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None] + [tokenizer.eos_token_id]
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None))


def ollama_parameters(max_new_tokens: int, temperature: float, top_p: float,
                      repetition_penalty: float) -> dict[str, float | int]:
    """Sampling settings under Ollama's PARAMETER names."""
    return {"temperature": temperature, "top_p": top_p, "repeat_penalty": repetition_penalty,
            "num_predict": max_new_tokens}


def modelfile_text(gguf_path: Path, wrappers: TurnWrappers, stops: list[str], parameters: dict[str, float | int],
                   adds_bos: bool) -> str:
    """The Modelfile: FROM the GGUF beside it, the TEMPLATE, stops and sampling ``parameters``
    (``ollama_parameters``).

    ``adds_bos``: llama.cpp puts BOS in front itself (the GGUF says the tokenizer adds it), so a
    template head that is only the BOS token is dropped rather than doubled."""
    if adds_bos:
        wrappers = TurnWrappers("", wrappers.user, wrappers.assistant, wrappers.system, wrappers.generation_prompt)
    template = go_template(wrappers)
    if '"""' in template:
        raise _refusal('its text holds """, which ends a Modelfile string')
    lines = [
        "# Ollama model of a socratune run: ollama create NAME -f THIS_FILE",
        "# The template, stops and defaults are the run's, so Ollama prompts the model as socratune does.",
        f"FROM ./{gguf_path.name}",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{stop}"' for stop in stops),
        *(f"PARAMETER {name} {value:g}" for name, value in parameters.items()),
    ]
    return "\n".join(lines) + "\n"
