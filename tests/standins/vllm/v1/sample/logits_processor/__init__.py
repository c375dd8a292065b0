"""Stand-in of vllm.v1.sample.logits_processor's exports (tests/standins/README.md)."""

from .interface import BatchUpdate, LogitsProcessor, MoveDirectionality

__all__ = ["BatchUpdate", "LogitsProcessor", "MoveDirectionality"]
