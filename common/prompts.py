"""Prompt formats: how a run lays out instruction and chat records as text, and which characters carry loss.

A *prompt format* is a Jinja template of the form Hugging Face chat templates take (``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``), rendered through the tokenizer's
``apply_chat_template``. The coordinator fixes the run's format (``PromptConfig``) once, from its settings and the
model's tokenizer, and sends the template text to every client with the model info, so that every client and the
coordinator's evaluation format every record identically; the template's SHA-256 is part of the run's fingerprint.

``format`` (coordinator setting ``prompt.format``):

* ``auto`` (default) -- the tokenizer's own chat template when it has one, else ``alpaca``;
* ``alpaca``         -- ``ALPACA_TEMPLATE``, the Stanford Alpaca layout, for base models without a chat template::

      Below is an instruction that describes a task. Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      ### Response:
      {output}</s>

  (with an ``input``: "...describes a task, paired with an input that provides further context. ..." and an
  ``### Input:`` section after the instruction; a leading system message replaces the preamble; further turns
  follow as more Instruction/Response sections);
* ``tokenizer``      -- the tokenizer's chat template (an error when it has none);
* a path to a ``.jinja`` file -- the user's own template, for any model.

Loss on responses (``train_on = "responses"``, the default, as in TRL's SFT trainer and LLaMA-Factory): only the
assistant turns carry loss, each from the end of its prompt (the conversation up to it, rendered with
``add_generation_prompt``) to its end (the conversation through it), so the response's end-of-turn markup and EOS are
learnt but no prompt token is. This needs a template that renders a conversation turn by turn (each prefix of the
conversation renders as a prefix of the whole); a template that does not (e.g. one that rewrites earlier turns) is
refused for that record with an error, and ``train_on = "all"`` trains on every token instead. Plain text always
trains on every token.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcybgd.common.records import Document

__all__ = ["ALPACA_TEMPLATE", "FORMATS", "TRAIN_ON", "PromptFormat", "RenderedDocument", "resolve_prompt_format",
           "render_document"]

#: ``train_on`` values: loss on the assistant turns only, or on every token.
TRAIN_ON = ("responses", "all")
#: Named formats; anything else is a path to a Jinja template file.
FORMATS = ("auto", "alpaca", "tokenizer")

ALPACA_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set turns = messages -%}"
    "{{- 'Below is an instruction that describes a task' -}}"
    "{%- if turns and turns[0]['input'] is defined and turns[0]['input'] -%}"
    "{{- ', paired with an input that provides further context' -}}{%- endif -%}"
    "{{- '. Write a response that appropriately completes the request.\\n\\n' -}}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if not loop.first -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- if message['instruction'] is defined -%}"
    "{{- '### Instruction:\\n' + message['instruction'] + '\\n\\n' -}}"
    "{%- if message['input'] -%}{{- '### Input:\\n' + message['input'] + '\\n\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '### Response:\\n' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('the Alpaca format knows the roles system (first), user and assistant, not ' "
    "+ message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)


#: Templates that print the current date (Llama 3.x's "Today Date", others through ``strftime_now``) see this fixed
#: one instead, 26 July 2024 (Llama 3.1's own fallback): formatting must not depend on the machine's clock or time
#: zone, or clients and the evaluation would format one record differently on different days. Prepended to every
#: template; it renders nothing.
FIXED_CLOCK = (
    "{%- macro strftime_now(format) -%}{{- format|replace('%d', '26')|replace('%-d', '26')|replace('%b', 'Jul')"
    "|replace('%B', 'July')|replace('%m', '07')|replace('%Y', '2024')|replace('%y', '24')|replace('%A', 'Friday')"
    "|replace('%a', 'Fri')|replace('%H', '00')|replace('%M', '00')|replace('%S', '00')|replace('%j', '208') -}}"
    "{%- endmacro -%}"
)


@dataclass(frozen=True)
class PromptFormat:
    """A run's prompt format: the Jinja ``template``, a ``name`` for messages ("alpaca", "tokenizer" or the
    template file's name) and what carries loss (``train_on``: "responses" or "all")."""

    template: str
    name: str = "alpaca"
    train_on: str = "responses"

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {self.train_on!r}")
        if not self.template.strip():
            raise ValueError("a prompt format needs a non-empty template")

    @property
    def digest(self) -> str:
        """SHA-256 of what decides the formatted text and its loss (for the run's fingerprint and data caches)."""
        return hashlib.sha256(f"{self.train_on}\0{self.template}".encode()).hexdigest()


def resolve_prompt_format(format: str, train_on: str, tokenizer: Any) -> PromptFormat:
    """The run's ``PromptFormat`` from the setting ``format`` (see the module docstring) and the model's tokenizer."""
    own = getattr(tokenizer, "chat_template", None)
    own = own if isinstance(own, str) and own.strip() else None
    if format == "auto":
        return PromptFormat(own, "tokenizer", train_on) if own else PromptFormat(ALPACA_TEMPLATE, "alpaca", train_on)
    if format == "alpaca":
        return PromptFormat(ALPACA_TEMPLATE, "alpaca", train_on)
    if format == "tokenizer":
        if own is None:
            raise ValueError("prompt format 'tokenizer': this model's tokenizer has no chat template (a base model?); "
                             "use 'auto' or 'alpaca', or a Jinja template file")
        return PromptFormat(own, "tokenizer", train_on)
    path = Path(format)
    if not path.is_file():
        raise ValueError(f"prompt format {format!r} is neither one of {', '.join(FORMATS)} nor a template file")
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the prompt template {path}: {exc}") from exc
    return PromptFormat(template, path.name, train_on)


@dataclass(frozen=True)
class RenderedDocument:
    """A document as text, and the character ranges ``[start, stop)`` of it that carry loss."""

    text: str
    spans: tuple[tuple[int, int], ...]

    @property
    def all_trained(self) -> bool:
        return self.spans == ((0, len(self.text)),)


def render_document(doc: Document, fmt: PromptFormat, tokenizer: Any) -> RenderedDocument:
    """``doc`` as text in the format ``fmt``, with the spans that carry loss. Raises ``ValueError`` naming the
    document's source when the template fails on it or (loss on responses) it has no response to train on."""
    if not doc.is_chat:
        assert doc.text is not None
        return RenderedDocument(doc.text, ((0, len(doc.text)),))
    messages = doc.chat()
    text = _render(doc, fmt, tokenizer, messages, add_generation_prompt=False)
    if fmt.train_on == "all":
        return RenderedDocument(text, ((0, len(text)),))
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(doc, fmt, tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(doc, fmt, tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ValueError(f"{doc.source}: prompt format {fmt.name!r} does not render this conversation turn by "
                             f"turn, so its response {i} cannot be told from its prompt; use train_on = 'all'")
        if len(through) > len(prompt):
            spans.append((len(prompt), len(through)))
    if not spans:
        raise ValueError(f"{doc.source}: no assistant response to train on (the loss is on responses only; "
                         "train_on = 'all' trains on every token)")
    return RenderedDocument(text, tuple(spans))


def _render(doc: Document, fmt: PromptFormat, tokenizer: Any, messages: list[dict[str, str]], *,
            add_generation_prompt: bool) -> str:
    try:
        out = tokenizer.apply_chat_template(messages, chat_template=FIXED_CLOCK + fmt.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2's TemplateError, raise_exception(...), a missing key: all the record's fault
        raise ValueError(f"{doc.source}: prompt format {fmt.name!r} cannot render this record: {exc}") from exc
    if not isinstance(out, str):
        raise ValueError(f"{doc.source}: prompt format {fmt.name!r} rendered {type(out).__name__}, not text")
    return out
