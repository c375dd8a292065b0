"""Stand-in of vllm/v1/worker/gpu/sample/logits_processor/interface.py (vLLM 0.33.0, Model
Runner V2): same names, fields and contract; the runner's UVA and staged-write buffers
are reduced to what a processor reads (``.gpu`` tensors, ``.np`` arrays). See
tests/standins/README.md."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Buffer:
    """StagedWriteTensor / UvaBackedTensor as a processor sees them."""

    gpu: torch.Tensor
    np: np.ndarray


@dataclass(frozen=True)
class LogitsProcRequestState:
    device: torch.device
    max_num_reqs: int
    vocab_size: int
    all_token_ids: Buffer  # [max_num_reqs, max_model_len]
    prompt_len: Buffer  # [max_num_reqs]
    prefill_len: Buffer  # [max_num_reqs]
    total_len: Buffer  # [max_num_reqs]


@dataclass(frozen=True)
class LogitsContext:
    expanded_idx_mapping: torch.Tensor  # [num_logits_rows] row -> slot
    idx_mapping: torch.Tensor  # [num_reqs] batch position -> slot
    idx_mapping_np: np.ndarray
    expanded_local_pos: torch.Tensor
    input_ids: torch.Tensor
    pos: torch.Tensor
    seq_lens_upper_bound_np: np.ndarray


class LogitsProcessor(ABC):
    def __init__(self, vllm_config: Any, req_states: LogitsProcRequestState):  # noqa: B027
        pass

    @classmethod  # noqa: B027
    def validate_params(cls, sampling_params: Any) -> None:
        pass

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        return True

    def apply_staged_writes(self) -> None:  # noqa: B027
        pass

    @abstractmethod
    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        raise NotImplementedError
