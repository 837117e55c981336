"""What one request asks of decoding: answer length, temperature, top-p, stop strings and seed (`DecodingParams`).

Pure data, read by the answer stream (length, stop strings), the token sampler (temperature, top-p, seed) and the
engine. The names follow the OpenAI fields a client sends; `serve.protocol` checks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Dividing logits by a temperature this close to 0 overflows them to inf and the sampler fails on NaN probabilities;
# the limit of sampling as the temperature goes to 0 is greedy decoding anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class DecodingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW_TEMPERATURE) means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE
