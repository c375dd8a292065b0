"""The pure core of libfse: no I/O, no clocks, no processes (DESIGN §9).

metrics   Glass Box metrics of a logits row and of a candidate token
sampling  the Normal and Strict samplers (seeded per step, no hidden state)
guards    per-token guard thresholds
redo      propose -> evaluate -> commit, with lane assist and abort on a double fault
session   one guarded sequence: its committed state and evaluators
chain     the audit hash chain (canonical frame bytes)
canonical the canonical byte encoding shared by signatures and the chain
vocab     registered vocabularies (id -> bytes) and their digest

The shells (ring, service, server, signing, config, CLI) sit beside this package.
"""
