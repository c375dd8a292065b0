from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ACCEPT: _ClassVar[Decision]
    DECISION_HEALED: _ClassVar[Decision]
    DECISION_ABORT: _ClassVar[Decision]

class HealthBand(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_BAND_UNSPECIFIED: _ClassVar[HealthBand]
    HEALTH_BAND_HEALTHY: _ClassVar[HealthBand]
    HEALTH_BAND_DRIFTING: _ClassVar[HealthBand]
    HEALTH_BAND_HALT: _ClassVar[HealthBand]

class GateBand(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_BAND_UNSPECIFIED: _ClassVar[GateBand]
    GATE_BAND_HEALTHY: _ClassVar[GateBand]
    GATE_BAND_DRIFTING: _ClassVar[GateBand]
    GATE_BAND_STRICT: _ClassVar[GateBand]
    GATE_BAND_HALT: _ClassVar[GateBand]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_REDO: _ClassVar[Action]
    ACTION_BLOCK: _ClassVar[Action]
    ACTION_HALT: _ClassVar[Action]
    ACTION_FLAG: _ClassVar[Action]

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_NORMAL: _ClassVar[Sampler]
    SAMPLER_STRICT: _ClassVar[Sampler]

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_F32: _ClassVar[Dtype]
    DTYPE_F16: _ClassVar[Dtype]
    DTYPE_BF16: _ClassVar[Dtype]
DECISION_UNSPECIFIED: Decision
DECISION_ACCEPT: Decision
DECISION_HEALED: Decision
DECISION_ABORT: Decision
HEALTH_BAND_UNSPECIFIED: HealthBand
HEALTH_BAND_HEALTHY: HealthBand
HEALTH_BAND_DRIFTING: HealthBand
HEALTH_BAND_HALT: HealthBand
GATE_BAND_UNSPECIFIED: GateBand
GATE_BAND_HEALTHY: GateBand
GATE_BAND_DRIFTING: GateBand
GATE_BAND_STRICT: GateBand
GATE_BAND_HALT: GateBand
ACTION_UNSPECIFIED: Action
ACTION_REDO: Action
ACTION_BLOCK: Action
ACTION_HALT: Action
ACTION_FLAG: Action
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_NORMAL: Sampler
SAMPLER_STRICT: Sampler
DTYPE_UNSPECIFIED: Dtype
DTYPE_F32: Dtype
DTYPE_F16: Dtype
DTYPE_BF16: Dtype

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "repetition_window", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_WINDOW_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    repetition_window: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., repetition_window: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class RegisterVocabularyRequest(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tokens: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RegisterVocabularyResponse(_message.Message):
    __slots__ = ("vocab_digest", "vocab_size", "key_id")
    VOCAB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    vocab_digest: str
    vocab_size: int
    key_id: str
    def __init__(self, vocab_digest: _Optional[str] = ..., vocab_size: _Optional[int] = ..., key_id: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "vocab_digest", "sampling", "policy", "prompt_token_ids", "ring_name", "model_id", "fast_lane")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RING_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FAST_LANE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    vocab_digest: str
    sampling: SamplingParams
    policy: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ring_name: str
    model_id: str
    fast_lane: bool
    def __init__(self, session_id: _Optional[str] = ..., vocab_digest: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., policy: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., ring_name: _Optional[str] = ..., model_id: _Optional[str] = ..., fast_lane: _Optional[bool] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "opening_nonce", "session_secret", "policy_digest", "session_tag", "genesis_hash", "key_id", "lane_socket", "lane_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPENING_NONCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    POLICY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SESSION_TAG_FIELD_NUMBER: _ClassVar[int]
    GENESIS_HASH_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LANE_SOCKET_FIELD_NUMBER: _ClassVar[int]
    LANE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    opening_nonce: bytes
    session_secret: bytes
    policy_digest: str
    session_tag: int
    genesis_hash: bytes
    key_id: str
    lane_socket: str
    lane_token: bytes
    def __init__(self, session_id: _Optional[str] = ..., opening_nonce: _Optional[bytes] = ..., session_secret: _Optional[bytes] = ..., policy_digest: _Optional[str] = ..., session_tag: _Optional[int] = ..., genesis_hash: _Optional[bytes] = ..., key_id: _Optional[str] = ..., lane_socket: _Optional[str] = ..., lane_token: _Optional[bytes] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "session_secret")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_secret: bytes
    def __init__(self, session_id: _Optional[str] = ..., session_secret: _Optional[bytes] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("steps", "chain_hash", "final_hits", "receipt")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    FINAL_HITS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    steps: int
    chain_hash: bytes
    final_hits: _containers.RepeatedCompositeFieldContainer[Reason]
    receipt: Receipt
    def __init__(self, steps: _Optional[int] = ..., chain_hash: _Optional[bytes] = ..., final_hits: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("session_id", "genesis_hash", "chain_hash", "steps", "accepted", "healed", "aborted", "first_timestamp_ns", "last_timestamp_ns", "policy_digest", "key_id", "signature")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GENESIS_HASH_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HEALED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    FIRST_TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    POLICY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    genesis_hash: bytes
    chain_hash: bytes
    steps: int
    accepted: int
    healed: int
    aborted: int
    first_timestamp_ns: int
    last_timestamp_ns: int
    policy_digest: str
    key_id: str
    signature: bytes
    def __init__(self, session_id: _Optional[str] = ..., genesis_hash: _Optional[bytes] = ..., chain_hash: _Optional[bytes] = ..., steps: _Optional[int] = ..., accepted: _Optional[int] = ..., healed: _Optional[int] = ..., aborted: _Optional[int] = ..., first_timestamp_ns: _Optional[int] = ..., last_timestamp_ns: _Optional[int] = ..., policy_digest: _Optional[str] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReloadPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadPolicyResponse(_message.Message):
    __slots__ = ("policy_digests",)
    class PolicyDigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    POLICY_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    policy_digests: _containers.ScalarMap[str, str]
    def __init__(self, policy_digests: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RingRef(_message.Message):
    __slots__ = ("slot", "row", "seq")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    slot: int
    row: int
    seq: int
    def __init__(self, slot: _Optional[int] = ..., row: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class InlineLogits(_message.Message):
    __slots__ = ("data", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: Dtype
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[Dtype, str]] = ...) -> None: ...

class CompactLogits(_message.Message):
    __slots__ = ("moments", "top_logits", "top_ids")
    MOMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    moments: _containers.RepeatedScalarFieldContainer[float]
    top_logits: _containers.RepeatedScalarFieldContainer[float]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, moments: _Optional[_Iterable[float]] = ..., top_logits: _Optional[_Iterable[float]] = ..., top_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "session_secret", "step", "ring", "inline", "compact")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_SECRET_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_secret: bytes
    step: int
    ring: RingRef
    inline: InlineLogits
    compact: CompactLogits
    def __init__(self, session_id: _Optional[str] = ..., session_secret: _Optional[bytes] = ..., step: _Optional[int] = ..., ring: _Optional[_Union[RingRef, _Mapping]] = ..., inline: _Optional[_Union[InlineLogits, _Mapping]] = ..., compact: _Optional[_Union[CompactLogits, _Mapping]] = ...) -> None: ...

class StepBatchRequest(_message.Message):
    __slots__ = ("steps", "seal")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepRequest]
    seal: bool
    def __init__(self, steps: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ..., seal: _Optional[bool] = ...) -> None: ...

class StepBatchResponse(_message.Message):
    __slots__ = ("responses", "seal")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[StepResponse]
    seal: BatchSeal
    def __init__(self, responses: _Optional[_Iterable[_Union[StepResponse, _Mapping]]] = ..., seal: _Optional[_Union[BatchSeal, _Mapping]] = ...) -> None: ...

class BatchSeal(_message.Message):
    __slots__ = ("key_id", "digests", "signature")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    digests: bytes
    signature: bytes
    def __init__(self, key_id: _Optional[str] = ..., digests: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("code", "value", "threshold", "sampler", "detail", "action", "token_id", "span_start", "span_end")
    CODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_START_FIELD_NUMBER: _ClassVar[int]
    SPAN_END_FIELD_NUMBER: _ClassVar[int]
    code: str
    value: float
    threshold: float
    sampler: Sampler
    detail: str
    action: Action
    token_id: int
    span_start: int
    span_end: int
    def __init__(self, code: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., detail: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., token_id: _Optional[int] = ..., span_start: _Optional[int] = ..., span_end: _Optional[int] = ...) -> None: ...

class TokenMetrics(_message.Message):
    __slots__ = ("entropy_nats", "neg_logprob_nats", "rank", "margin", "selected_prob", "max_prob", "logit_variance", "l2_norm", "varentropy", "running_ppl")
    ENTROPY_NATS_FIELD_NUMBER: _ClassVar[int]
    NEG_LOGPROB_NATS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    SELECTED_PROB_FIELD_NUMBER: _ClassVar[int]
    MAX_PROB_FIELD_NUMBER: _ClassVar[int]
    LOGIT_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    L2_NORM_FIELD_NUMBER: _ClassVar[int]
    VARENTROPY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_PPL_FIELD_NUMBER: _ClassVar[int]
    entropy_nats: float
    neg_logprob_nats: float
    rank: int
    margin: float
    selected_prob: float
    max_prob: float
    logit_variance: float
    l2_norm: float
    varentropy: float
    running_ppl: float
    def __init__(self, entropy_nats: _Optional[float] = ..., neg_logprob_nats: _Optional[float] = ..., rank: _Optional[int] = ..., margin: _Optional[float] = ..., selected_prob: _Optional[float] = ..., max_prob: _Optional[float] = ..., logit_variance: _Optional[float] = ..., l2_norm: _Optional[float] = ..., varentropy: _Optional[float] = ..., running_ppl: _Optional[float] = ...) -> None: ...

class StreamState(_message.Message):
    __slots__ = ("band", "pending", "risk", "window_neg_logprob_nats", "window_entropy_nats", "window_ppl", "e_value")
    BAND_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    WINDOW_NEG_LOGPROB_NATS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ENTROPY_NATS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_PPL_FIELD_NUMBER: _ClassVar[int]
    E_VALUE_FIELD_NUMBER: _ClassVar[int]
    band: GateBand
    pending: GateBand
    risk: float
    window_neg_logprob_nats: float
    window_entropy_nats: float
    window_ppl: float
    e_value: float
    def __init__(self, band: _Optional[_Union[GateBand, str]] = ..., pending: _Optional[_Union[GateBand, str]] = ..., risk: _Optional[float] = ..., window_neg_logprob_nats: _Optional[float] = ..., window_entropy_nats: _Optional[float] = ..., window_ppl: _Optional[float] = ..., e_value: _Optional[float] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("session_id", "step", "decision", "token_id", "sampler", "reasons", "metrics", "band", "prev_chain_hash", "chain_hash", "key_id", "signature", "policy_digest", "stream", "proposals")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BAND_FIELD_NUMBER: _ClassVar[int]
    PREV_CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    POLICY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    decision: Decision
    token_id: int
    sampler: Sampler
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    metrics: TokenMetrics
    band: HealthBand
    prev_chain_hash: bytes
    chain_hash: bytes
    key_id: str
    signature: bytes
    policy_digest: str
    stream: StreamState
    proposals: _containers.RepeatedCompositeFieldContainer[Proposal]
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., decision: _Optional[_Union[Decision, str]] = ..., token_id: _Optional[int] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., metrics: _Optional[_Union[TokenMetrics, _Mapping]] = ..., band: _Optional[_Union[HealthBand, str]] = ..., prev_chain_hash: _Optional[bytes] = ..., chain_hash: _Optional[bytes] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., policy_digest: _Optional[str] = ..., stream: _Optional[_Union[StreamState, _Mapping]] = ..., proposals: _Optional[_Iterable[_Union[Proposal, _Mapping]]] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("token_id", "sampler", "reasons")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    sampler: Sampler
    reasons: int
    def __init__(self, token_id: _Optional[int] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., reasons: _Optional[int] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("session_id", "step", "code", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    code: int
    message: str
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("verdict", "error")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    error: StepError
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class StepsRequest(_message.Message):
    __slots__ = ("request", "batch")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    request: StepRequest
    batch: StepBatchRequest
    def __init__(self, request: _Optional[_Union[StepRequest, _Mapping]] = ..., batch: _Optional[_Union[StepBatchRequest, _Mapping]] = ...) -> None: ...

class StepsResponse(_message.Message):
    __slots__ = ("response", "batch")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    response: StepResponse
    batch: StepBatchResponse
    def __init__(self, response: _Optional[_Union[StepResponse, _Mapping]] = ..., batch: _Optional[_Union[StepBatchResponse, _Mapping]] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...
