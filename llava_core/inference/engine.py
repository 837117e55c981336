"""Generate answers for already-validated chat requests with the exported LLaVA model, several at a time.

The engine knows nothing about HTTP: it takes chat-template messages (images as `{"type": "image"}` parts), the
decoded images in the order they appear, and each request's decoding parameters, and runs a batch of them as one
left-padded `generate` call. Every request keeps its own temperature, top-p and seed
(`token_sampler.PerRequestSampler`), max_tokens and stop strings (`BatchProgress` ends each row on its own), and after
every decoding step each request gets its new text (`answer_stream`), which is what streaming sends. Prompts and
images go through the export's own chat template and processor (which pads LLaVA-1.5's images to a square and tiles
AnyRes images), as in any other reader of the export, so a served answer is the answer the evaluation measured.
OneVision's videos (sampled frames, `{"type": "video"}` parts) are squashed by the same frame path prepare stores
them with.
"""
from __future__ import annotations

import copy
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from llava_core.data import images as image_ops
from llava_core.data.image_layouts import processor_images
from llava_core.inference.answer_stream import AnswerStream, Completion, StreamEvent, completion_from_events
from llava_core.inference.decoding import DecodingParams
from llava_core.inference.token_sampler import PerRequestSampler
from llava_core.model.build import load_llava
from llava_core.model.families import family
from llava_core.model.processors import frame_processor, image_token_counts, video_token_count
from llava_core.model.tokens import IMAGE_TOKEN

log = logging.getLogger(__name__)

# Called after every decoding step with one entry per request: its new event, or None when it had already finished.
StepCallback = Callable[[list[Optional[StreamEvent]]], None]


@dataclass
class GenerationRequest:
    messages: list[dict]  # chat-template messages; each image is a {"type": "image"} part
    images: list[Image.Image] = field(default_factory=list)  # decoded, in the order their parts appear
    decoding: DecodingParams = field(default_factory=lambda: DecodingParams(max_tokens=64))
    # OneVision: each video's sampled RGB frames (height, width, 3) uint8, in the order their parts appear
    videos: list[list[np.ndarray]] = field(default_factory=list)
    # Set when nobody waits for the answer any more (the client went away): its row stops at the next step.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


class BatchProgress(StoppingCriteria):
    """Feeds each step's new tokens to the requests' answer streams and ends each row when its answer is done (or
    when its sampling failed: that row alone ends with its error)."""

    def __init__(self, streams: list[AnswerStream], requests: list[GenerationRequest], sampler: PerRequestSampler,
                 on_step: StepCallback):
        self.streams = streams
        self.requests = requests
        self.sampler = sampler
        self.on_step = on_step
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        events: list[Optional[StreamEvent]] = []
        for row, (stream, request, token) in enumerate(zip(self.streams, self.requests, input_ids[:, -1].tolist())):
            if stream.done:
                events.append(None)
            elif row in self.sampler.failures:
                events.append(stream.fail(self.sampler.failures[row]))
            elif request.cancelled.is_set():
                stream.finish("cancelled")
                events.append(None)
            else:
                events.append(stream.push(token))
        self.steps += 1
        self.on_step(events)
        return torch.tensor([s.done for s in self.streams], dtype=torch.bool, device=input_ids.device)

    def fail_unfinished(self, error: BaseException) -> None:
        """Generation broke after answers had started: every row still running ends with the error."""
        self.on_step([None if s.done else s.fail(error) for s in self.streams])


BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # sentencepiece's byte pieces (LLaMA, Vicuna, Mistral)


class GenerationEngine:
    def __init__(self, model_dir: str, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 halves a 7B model's memory on GPU; CPUs run it slowly, so they keep fp32 (what the evaluation used).
        dtype = dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        model, processor = load_llava(model_dir, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.family = family(model.config.model_type)
        self.tokenizer = processor.tokenizer
        # Generation appends on the right, so padding must go on the left, away from where answers start.
        self.tokenizer.padding_side = "left"
        self.eos_token_ids = self._eos_token_ids()
        self.byte_token_ids = frozenset(i for token, i in self.tokenizer.get_vocab().items()
                                        if BYTE_FALLBACK_TOKEN.fullmatch(token))
        self.context_length = model.config.text_config.max_position_embeddings
        # The Rust tokenizer raises "Already borrowed" when two threads use it at once. Running batches share one
        # (prompts, per-step decoding); request validation counts prompt tokens with its own copy, so a long prompt
        # being counted never holds up the batches.
        self._tokenizer_lock = threading.Lock()
        self._counting_tokenizer = copy.deepcopy(self.tokenizer)
        self._counting_lock = threading.Lock()
        self.tokens_per_image = None if self.family.takes_image_sizes() else self._measure_tokens_per_image()
        self.takes_videos = self.family.takes_videos()
        self.frames = frame_processor(processor) if self.takes_videos else None

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

    def adds_special_tokens(self, prompt: str) -> bool:
        """transformers' rule (`ProcessorMixin.apply_chat_template`), which vLLM's chat follows too: a rendered prompt
        that starts with the BOS (vicuna_v1's template writes it) gets no second one when it is tokenized."""
        bos = self.tokenizer.bos_token
        return not (bos and prompt.startswith(bos))

    def count_image_tokens(self, images: list[Image.Image], videos: list | None = None) -> int:
        """The `<image>` and `<video>` tokens a request's images and videos expand to, from their sizes alone
        (AnyRes: each image's tiles, unpadding and row newlines; OneVision: base views only when there are several;
        a video: its frames' pooled features and one newline)."""
        video_tokens = sum(self.count_video_tokens(video) for video in videos or [])
        if self.tokens_per_image is not None:
            return len(images) * self.tokens_per_image + video_tokens
        sizes = [(im.height, im.width) for im in images]
        return sum(image_token_counts(self.processor, sizes, self.family)) + video_tokens

    def count_video_tokens(self, frames: list[np.ndarray]) -> int:
        size = self.processor.image_processor.size  # every frame is squashed to it
        return video_token_count(self.processor, len(frames), size["height"], size["width"])

    def count_prompt_tokens(self, messages: list[dict], images: list[Image.Image], videos: list | None = None,
                            media_tokens: int | None = None) -> int:
        """The prompt's length as the model sees it, image and video tokens included, without preprocessing any;
        `media_tokens`: `count_image_tokens` of the same images and videos, when the caller has it already."""
        prompt = self.render_prompt(messages)
        with self._counting_lock:
            text_tokens = len(self._counting_tokenizer(prompt, add_special_tokens=self.adds_special_tokens(prompt))
                              ["input_ids"])
        if media_tokens is None:
            media_tokens = self.count_image_tokens(images, videos)
        return text_tokens - len(images) - len(videos or []) + media_tokens

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """One completion per request, in order."""
        events: list[list[StreamEvent]] = [[] for _ in requests]

        def collect(step: list[Optional[StreamEvent]]) -> None:
            for row, event in enumerate(step):
                if event is not None:
                    events[row].append(event)

        self.run_batch(requests, collect)
        return [completion_from_events(row) for row in events]

    def run_batch(self, requests: list[GenerationRequest], on_step: StepCallback) -> None:
        """Generate for all `requests` in one left-padded batch, reporting every step's new text to `on_step`.

        Each request's last event has its `finish_reason` and token counts. One request's failure is its own: a row
        whose sampling fails ends alone, and a batch that fails before any answer started (preprocessing, the first
        forward pass) is split in halves and run again, until the request that fails alone gets its error event."""
        self._run_isolated(requests, list(range(len(requests))), on_step)

    def _run_isolated(self, requests: list[GenerationRequest], rows: list[int], on_step: StepCallback) -> None:
        def report(events: list[Optional[StreamEvent]]) -> None:  # this part's events, placed in the whole batch's
            placed: list[Optional[StreamEvent]] = [None] * len(requests)
            for row, event in zip(rows, events):
                placed[row] = event
            on_step(placed)

        try:
            self._generate([requests[row] for row in rows], report)
        except Exception as error:  # noqa: BLE001 - nothing was answered yet: find whose request it is
            if len(rows) == 1:
                report([StreamEvent("", "error", error=error)])
                return
            log.warning("a batch of %d failed before answering (%s: %s); running it again in halves", len(rows),
                        type(error).__name__, error)
            middle = len(rows) // 2
            self._run_isolated(requests, rows[:middle], on_step)
            self._run_isolated(requests, rows[middle:], on_step)

    @torch.inference_mode()
    def _generate(self, requests: list[GenerationRequest], on_step: StepCallback) -> None:
        """One `generate` call; raises only when it failed before any step was reported."""
        inputs = self._batch_inputs(requests)
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        streams = [AnswerStream(r.decoding, int(length), self.eos_token_ids, self._decode, self.byte_token_ids)
                   for r, length in zip(requests, prompt_lengths)]
        sampler = PerRequestSampler([r.decoding for r in requests])
        progress = BatchProgress(streams, requests, sampler, on_step)
        try:
            self.model.generate(
                **inputs,
                max_new_tokens=max(r.decoding.max_tokens for r in requests),
                pad_token_id=self.tokenizer.pad_token_id,
                # Sampled rows pick their token in the sampler and leave only it possible, so argmax keeps it.
                do_sample=False,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([progress]),
            )
        except Exception as error:  # noqa: BLE001 - text was handed out already: it cannot be run again
            if not progress.steps:
                raise
            # Each request's own error response logs the trace; this line ties them to one batch.
            log.warning("generation failed after %d steps (%s); its %d unfinished answers end with the error",
                        progress.steps, type(error).__name__, sum(not s.done for s in streams))
            progress.fail_unfinished(error)
            return
        leftovers = [None if s.done else s.finish("length") for s in streams]
        if any(event is not None for event in leftovers):  # generate stopped first (a model-wide length limit)
            on_step(leftovers)

    def _batch_inputs(self, group: list[GenerationRequest]) -> dict:
        prompts = [self.render_prompt(r.messages) for r in group]
        videos = self._squashed_videos(group)
        with self._tokenizer_lock:
            pictures = processor_images(self.family.name, [r.images for r in group])
            inputs = self.processor(images=pictures, videos=videos, text=prompts, padding=True, return_tensors="pt",
                                    add_special_tokens=self.adds_special_tokens(prompts[0]))
        return inputs.to(self.device)

    def _squashed_videos(self, group: list[GenerationRequest]) -> list[np.ndarray] | None:
        """The batch's videos as (frames, height, width, 3) uint8 at the tower's size, squashed as prepare squashed
        them: whichever video processor the processor holds then resizes nothing."""
        videos = [video for r in group for video in r.videos]
        if not videos:
            return None
        if not self.takes_videos:  # the protocol refuses them first; a direct caller learns why here
            raise ValueError(f"a {self.family.name} model takes no video; llava_onevision models do")
        return [np.moveaxis(self.frames.squash(video), 1, -1) for video in videos]

    def _decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)
