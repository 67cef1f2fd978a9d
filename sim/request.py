"""A request's life in an engine: the state both clocks (simulator, replayer) share."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False, kw_only=True, slots=True)   # slots: a day of traffic holds many
class Request:
    index: int              # position in the workload
    rid: str
    task: str
    prompt_tokens: int
    output_tokens: int
    row0: int               # first trace row of this request
    arrival_s: float
    slo: dict               # {"ttft_s", "tpot_s", "e2e_s"} (any subset)
    expected_output: float  # the task's mean output length: what a scheduler may know
    # progress
    prefilled: int = 0      # prompt tokens processed
    generated: int = 0      # output tokens produced
    admitted_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    # per-request policy accounting (token-level routes)
    hits: int = 0
    misses: int = 0
    reroutes: int = 0
    gate_kept: float = 0.0
    routes: int = 0         # token-layer routes served
    task_id: str | None = None   # the task the policy identified (eMoE), None: not identified
    rejected: str = ""           # why the engine refused it ("" if it did not)
    generated_ids: list[int] | None = None   # real-weights replay: tokens generated (set as it prefills)

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prompt_tokens

    @property
    def context(self) -> int:
        """Tokens whose KV is held: prompt processed so far plus generated tokens fed back."""
        return self.prefilled + max(self.generated - 1, 0)

    @property
    def next_row(self) -> int:
        """Trace row of the next token to process: prompt rows, then generated rows."""
        if self.in_prefill:
            return self.row0 + self.prefilled
        return self.row0 + self.prompt_tokens + self.generated - 1

    def deadline(self, kind: str = "ttft_s") -> float:
        return self.arrival_s + self.slo.get(kind, float("inf"))
