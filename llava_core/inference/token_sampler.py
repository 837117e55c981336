"""Per-request token sampling inside one batched `generate` call.

`generate` applies one temperature and one top-p to a whole batch. To let every request keep its own `DecodingParams`
(and a seeded request its own random stream, whoever shares its batch), the sampling happens here, in a logits
processor: each sampled row draws its token with its own `torch.Generator` and leaves only that token possible, so
`generate` can run greedy (argmax) for the whole batch. Greedy rows pass through untouched, which keeps them
identical to plain greedy `generate`.
"""
from __future__ import annotations

import secrets
from typing import Optional

import torch
from transformers import LogitsProcessor

from llava_core.inference.decoding import DecodingParams


class PerRequestSampler(LogitsProcessor):
    """Draws each sampled row's next token with that row's temperature, top-p and random generator.

    A row whose draw fails is recorded in `failures` (row -> error) and given any token: the caller ends that row
    with its error, and the other rows of the batch go on."""

    def __init__(self, params: list[DecodingParams]):
        self.params = params
        self.generators = [None if p.greedy else new_generator(p.seed) for p in params]
        self.failures: dict[int, Exception] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, (params, generator) in enumerate(zip(self.params, self.generators)):
            if generator is None or row in self.failures:
                continue
            try:
                token = draw(scores[row], params.temperature, params.top_p, generator)
            except Exception as error:  # noqa: BLE001 - one row's failure is that row's answer, not the batch's
                self.failures[row] = error
                token = 0
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores


def new_generator(seed: Optional[int]) -> torch.Generator:
    generator = torch.Generator()  # on the CPU: draws do not depend on the accelerator
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if not torch.isfinite(probs).all():
        raise FloatingPointError(f"the token probabilities are not finite (temperature {temperature:g})")
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities add up to top_p (the one that crosses it included)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # probability mass ranked above each token
    dropped = before >= top_p
    dropped[0] = False  # the most likely token stays whatever top_p is: a tiny top_p means greedy, never nothing
    sorted_probs[dropped] = 0.0
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()
