"""The guard's processor, recording every batch change vLLM makes, in the engine process
itself (tests/gpu/vllm_guarded.py loads it by name: a patch made in the driver process
never reaches vLLM's engine process). Lines of JSON go to the file ``FSE_RECORD``."""

from __future__ import annotations

import json
import os
from typing import Any

from engine_adapters import vllm as adapter


def _write(record: dict[str, Any]) -> None:
    with open(os.environ["FSE_RECORD"], "a") as f:
        f.write(json.dumps(record) + "\n")


class RecordingV1(adapter.FseLogitsProcessorV1):
    def update_state(self, batch_update: Any) -> None:
        if batch_update is not None:
            _write(
                {
                    "runner": "v1",
                    "batch_size": batch_update.batch_size,
                    "removed": list(batch_update.removed),
                    "added": [a[0] for a in batch_update.added],
                    "moved": [[a, b, d.name] for a, b, d in batch_update.moved],
                }
            )
        super().update_state(batch_update)


class RecordingV2(adapter.FseLogitsProcessorV2):
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        _write({"runner": "v2", "add_request": req_idx})
        return super().add_request(req_idx, sampling_params)

    def apply(self, logits: Any, ctx: Any) -> Any:
        _write({"runner": "v2", "idx_mapping": [int(i) for i in ctx.idx_mapping_np]})
        return super().apply(logits, ctx)


class Recording(adapter.FseLogitsProcessor):
    """Loaded as ``tests.gpu.recording:Recording``: the runner vLLM's configuration picks."""

    def __new__(cls, vllm_config: Any, *args: Any) -> Any:  # type: ignore[misc]
        if getattr(vllm_config, "use_v2_model_runner", False):
            return RecordingV2(vllm_config, *args)
        return RecordingV1(vllm_config, *args)
