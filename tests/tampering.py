"""A real gRPC sidecar that lies: it runs the real GuardService and then alters verdicts.

Used to prove that the adapter's checks (signature, session, step, chain) reject what a
compromised or confused sidecar sends. Not a mock: real server, real service, real keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
from concurrent import futures
from pathlib import Path

import grpc

from sidecar._pb.fse.v1 import guard_pb2 as pb
from sidecar._pb.fse.v1 import guard_pb2_grpc as pb_grpc
from sidecar.config import SidecarConfig
from sidecar.core import chain
from sidecar.service import GuardService, session_opened
from sidecar.signing import Signer


class TamperingServicer(pb_grpc.GuardServiceServicer):
    def __init__(self, service: GuardService, mode: str, from_step: int, resigner: Signer, other: Signer | None) -> None:
        self.service, self.mode, self.from_step = service, mode, from_step
        self.resigner, self.other = resigner, other
        self.claimed_key_id = resigner.key_id
        self.previous: pb.Verdict | None = None

    def RegisterVocabulary(self, request, context):
        v = self.service.register_vocabulary(list(request.tokens))
        return pb.RegisterVocabularyResponse(vocab_digest=v.digest, vocab_size=v.size)

    def OpenSession(self, request, context):
        s = self.service.open_session(request)
        r = session_opened(s, self.claimed_key_id)
        if self.mode == "other_genesis":  # a genesis that binds another opening
            r.genesis_hash = hashlib.sha256(b"another opening").digest()
        elif self.mode == "short_nonce":  # an 8-byte nonce, and a genesis honestly computed over it
            assert s.opening is not None
            r.opening_nonce = s.opening.opening_nonce[:8]
            r.genesis_hash = dataclasses.replace(s.opening, opening_nonce=r.opening_nonce).genesis()
        return r

    def CloseSession(self, request, context):
        closed = self.service.close_session(request.session_id, request.session_secret)
        return pb.CloseSessionResponse(
            steps=closed.session.next_step, chain_hash=closed.session.chain_hash, receipt=closed.receipt
        )

    def Steps(self, request_iterator, context):
        for item in request_iterator:
            req = item.request
            v = self.service.step(req)
            honest = pb.Verdict()
            honest.CopyFrom(v)
            if req.step >= self.from_step:
                if self.mode == "other_key" and self.other is not None:
                    self.other.sign(v)  # a key the adapter does not trust
                elif self.mode == "wrong_session":
                    v.session_id = "someone-else"
                elif self.mode == "stale_step" and self.previous is not None:
                    v = self.previous  # replay the previous, validly signed verdict
                elif self.mode == "bad_signature":
                    v.signature = bytes(len(v.signature))  # the trusted key id, a signature of zeros
                elif self.mode == "bad_decision":
                    # an undefined decision in a consistent, properly signed verdict
                    v.decision = 7  # type: ignore[assignment]
                    frame = chain.frame_bytes(v.session_id, v.step, v.token_id, v.decision, v.sampler, v.proposals, v.reasons)
                    v.chain_hash = chain.chain_next(v.prev_chain_hash, frame)
                elif self.mode == "other_policy":
                    v.policy_digest = "0" * 64  # judged under a policy the session was not opened with
                elif self.mode == "other_token":
                    v.token_id = (v.token_id + 1) % 1000
                elif self.mode == "out_of_vocab":
                    # a consistent chain and a valid signature around an impossible token
                    v.token_id = self.service.session(req.session_id).vocab_size
                    frame = chain.frame_bytes(v.session_id, v.step, v.token_id, v.decision, v.sampler, v.proposals, v.reasons)
                    v.chain_hash = chain.chain_next(v.prev_chain_hash, frame)
                if self.mode in ("wrong_session", "other_policy", "other_token", "out_of_vocab", "bad_decision"):
                    self.resigner.sign(v)  # properly signed by the trusted key: only binding checks catch it
            self.previous = honest
            yield pb.StepsResponse(response=pb.StepResponse(verdict=v))


def start_tampering_server(tmp: Path, trusted: Signer, other: Signer | None, mode: str, from_step: int = 0):
    service = GuardService(SidecarConfig(), trusted)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GuardServiceServicer_to_server(TamperingServicer(service, mode, from_step, trusted, other), server)
    target = f"unix:{tmp / 'tamper.sock'}"
    server.add_insecure_port(target)
    server.start()
    return server, target
