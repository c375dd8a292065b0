"""A model's chat template, from its GGUF metadata (``tokenizer.chat_template``) or a file
the operator names, rendered by llama-cpp-python's sandboxed Jinja2 formatter (the one its
own server uses, aligned with Transformers' rendering)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sidecar.errors import ConfigError

METADATA_KEY = "tokenizer.chat_template"


class ChatTemplate:
    def __init__(self, template: str, *, bos_token: str, eos_token: str, source: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)
        except Exception as exc:  # noqa: BLE001 - jinja2's syntax errors, named with where the template came from
            raise ConfigError(f"the chat template from {source} does not parse: {exc}") from None
        self.source = source

    @classmethod
    def of(cls, llama: Any, path: Path | None = None) -> ChatTemplate:
        """The template in ``path`` if given, else the GGUF's own; ConfigError when neither."""
        model = llama._model
        eos, bos = llama.token_eos(), llama.token_bos()
        tokens = {
            "eos_token": model.token_get_text(eos) if eos >= 0 else "",
            "bos_token": model.token_get_text(bos) if bos >= 0 else "",
        }
        if path is not None:
            try:
                return cls(path.read_text(encoding="utf-8"), source=str(path), **tokens)
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--chat-template: cannot read {path}: {exc}") from None
        template = (getattr(llama, "metadata", None) or {}).get(METADATA_KEY)
        if not template:
            raise ConfigError(
                f"the model has no chat template in its metadata ({METADATA_KEY}): pass --chat-template FILE (a Jinja2 template)"
            )
        return cls(template, source=f"the GGUF's {METADATA_KEY}", **tokens)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages`` ({"role", "content"}), ending in the assistant's turn.
        ValueError when the template refuses them (its own ``raise_exception``)."""
        try:
            return str(self._formatter(messages=messages).prompt)  # type: ignore[arg-type]
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template's runtime error is the request's to hear about
            raise ValueError(f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from None
