"""Generate answers for already-validated chat requests with the exported LLaVA model, several at a time.

The engine knows nothing about HTTP: it takes chat-template messages (images as `{"type": "image"}` parts), the
decoded images in the order they appear, and sampling settings, and runs them as one left-padded batch per group of
compatible sampling settings. Prompts and images go through exactly the steps training and `llava_core.eval` use
(chat template, pad-to-square with the processor's mean colour, `LlavaProcessor`), so a served answer is the answer
the evaluation measured.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
from PIL import Image

from llava_core.data import images as image_ops
from llava_core.model.build import IMAGE_TOKEN, load_llava

# Dividing logits by a temperature this close to 0 overflows them to inf and the sampler fails on NaN probabilities;
# the limit of sampling as the temperature goes to 0 is greedy decoding anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5

@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW_TEMPERATURE) means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass
class GenerationRequest:
    messages: list[dict]  # chat-template messages; each image is a {"type": "image"} part
    images: list[Image.Image] = field(default_factory=list)  # decoded, in the order their parts appear
    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(max_tokens=64))


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def sampling_group_key(request: GenerationRequest, index: int) -> tuple:
    """Requests with equal keys can share one `generate` call (max_tokens and stop are applied per row afterwards)."""
    sampling = request.sampling
    if sampling.greedy:
        return ("greedy",)
    if sampling.seed is not None:
        # A seeded request runs alone: its draws would otherwise depend on which requests shared its batch.
        return ("seeded", index)
    return ("sampled", sampling.temperature, sampling.top_p)


def group_by_sampling(requests: list[GenerationRequest]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(sampling_group_key(request, index), []).append(index)
    return list(groups.values())


def first_stop_position(text: str, stops: tuple[str, ...]) -> Optional[int]:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


class GenerationEngine:
    def __init__(self, model_dir: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 halves a 7B model's memory on GPU; CPUs run it slowly, so they keep fp32 (what the evaluation used).
        dtype = dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        model, processor = load_llava(model_dir, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Generation appends on the right, so padding must go on the left, away from where answers start.
        self.tokenizer.padding_side = "left"
        self.pad_fill = image_ops.mean_colour(processor.image_processor)
        self.eos_token_ids = self._eos_token_ids()
        self.context_length = model.config.text_config.max_position_embeddings
        # The Rust tokenizer raises "Already borrowed" when request validation and a running batch use it at once.
        self._tokenizer_lock = threading.Lock()
        self.tokens_per_image = self._measure_tokens_per_image()

    def _eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {eos}

    def _measure_tokens_per_image(self) -> int:
        """How many tokens one `<image>` expands to, asked of the processor rather than recomputed from configs."""
        blank = image_ops.blank_image(self.processor.image_processor)
        expanded = self.processor(images=[blank], text=[IMAGE_TOKEN], return_tensors="pt")["input_ids"].shape[1]
        plain = len(self.tokenizer(IMAGE_TOKEN)["input_ids"])
        return expanded - plain + 1

    def render_prompt(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def count_prompt_tokens(self, messages: list[dict], n_images: int) -> int:
        """The prompt's length as the model sees it, image tokens included, without preprocessing any image."""
        prompt = self.render_prompt(messages)
        with self._tokenizer_lock:
            text_tokens = len(self.tokenizer(prompt)["input_ids"])
        return text_tokens + n_images * (self.tokens_per_image - 1)

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """One completion per request, in order."""
        completions: list[Optional[Completion]] = [None] * len(requests)
        for indices in group_by_sampling(requests):
            group = [requests[i] for i in indices]
            for index, completion in zip(indices, self._generate_group(group)):
                completions[index] = completion
        return completions

    def _generate_group(self, group: list[GenerationRequest]) -> list[Completion]:
        inputs = self._batch_inputs(group)
        sampling = group[0].sampling  # equal for the whole group, apart from max_tokens and stop
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        output = self.model.generate(
            **inputs,
            max_new_tokens=max(r.sampling.max_tokens for r in group),
            pad_token_id=self.tokenizer.pad_token_id,
            **self._sampling_kwargs(sampling),
        )
        prompt_width = inputs["input_ids"].shape[1]
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            self._completion(output[row, prompt_width:].tolist(), request.sampling, int(prompt_lengths[row]))
            for row, request in enumerate(group)
        ]

    def _batch_inputs(self, group: list[GenerationRequest]) -> dict:
        prompts = [self.render_prompt(r.messages) for r in group]
        # Training padded every image to a square of the mean colour ("pad" aspect ratio); do the same here.
        pictures = [image_ops.pad_to_square(image, self.pad_fill) for r in group for image in r.images]
        with self._tokenizer_lock:
            inputs = self.processor(images=pictures or None, text=prompts, padding=True, return_tensors="pt")
        return inputs.to(self.device)

    @staticmethod
    def _sampling_kwargs(sampling: SamplingSettings) -> dict:
        if sampling.greedy:
            return {"do_sample": False}
        # top_k=0 switches off transformers' default top-k of 50, which the OpenAI API does not have.
        return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}

    def _completion(self, new_tokens: list[int], sampling: SamplingSettings, prompt_tokens: int) -> Completion:
        tokens, finish_reason, generated = self._cut_at_end_of_sequence(new_tokens, sampling.max_tokens)
        text = self._decode(tokens)
        stop_at = first_stop_position(text, sampling.stop)
        if stop_at is not None:
            text, finish_reason = text[:stop_at], "stop"
            generated = self._tokens_until_stop(tokens, sampling.stop)
        # LLaVA's own serving strips the answer; the evaluation does too, so served and scored answers agree.
        return Completion(text.strip(), finish_reason, prompt_tokens, generated)

    def _cut_at_end_of_sequence(self, new_tokens: list[int], max_tokens: int) -> tuple[list[int], str, int]:
        """The answer's tokens, why it ended, and how many tokens were generated (the end-of-sequence one counts)."""
        for position, token in enumerate(new_tokens[:max_tokens]):
            if token in self.eos_token_ids:
                return new_tokens[:position], "stop", position + 1
        # The group ran to its longest max_tokens; a row that asked for fewer is cut to its own limit.
        tokens = new_tokens[:max_tokens]
        return tokens, "length", len(tokens)

    def _tokens_until_stop(self, tokens: list[int], stops: tuple[str, ...]) -> int:
        """Tokens generated up to the one that completed a stop string: what a server stopping early would count."""
        for count in range(1, len(tokens) + 1):
            if first_stop_position(self._decode(tokens[:count]), stops) is not None:
                return count
        return len(tokens)

    def _decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)
