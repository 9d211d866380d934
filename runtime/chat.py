"""Render the bundle's chat template (jinja2, sandboxed) the way transformers does.

Same environment settings as transformers' ``apply_chat_template``: ``trim_blocks`` and
``lstrip_blocks``, a ``raise_exception`` helper, ``strftime_now``, and ``bos_token`` /
``eos_token`` as text. The template comes from the bundle (untrusted input), hence the sandbox.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from llama_export.runtime.errors import InputError

Message = Mapping[str, Any]

_ROLES = ("system", "user", "assistant", "tool")


def _raise(message: str) -> None:
    raise InputError(f"chat template rejected the messages: {message}")


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise InputError(f"the bundle's chat template does not compile ({e}): "
                         "fix chat_template in tokenizer_config.json and re-export") from None


def validate_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...}: "
                         "e.g. [{'role': 'user', 'content': 'Hello'}]")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InputError(f"message {i} must be a dict with 'role' and 'content': "
                             "e.g. {'role': 'user', 'content': 'Hello'}")
        if m["role"] not in _ROLES:
            raise InputError(f"message {i} has role {m['role']!r}: use one of {', '.join(_ROLES)}")
        out.append(dict(m))
    return out


def render_chat(template: str | None, messages: Sequence[Message], *, bos_token: str,
                eos_token: str, add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``, ending with the assistant turn's header."""
    if not template:
        raise InputError("this bundle has no chat template: pass a plain prompt instead of chat "
                         "messages (or export a model whose tokenizer_config.json has one)")
    msgs = validate_messages(messages)
    from jinja2 import TemplateError

    try:
        text = _compile(template).render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise InputError(f"rendering the chat template failed ({e}): check the messages") from None
    return str(text)
