"""Turn one raw LLaVA row into one training example (or a rejection with a reason).

`RowPreparer` is the per-row work of the prepare stage; Ray Data runs it in a pool of actors (it holds a tokenizer and
an image processor), and benchmarks and tests call it directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from llava_core.data import formats, images, templates
from llava_core.data.formats import RowError


@dataclass
class RowSettings:
    template: str
    image_folder: str
    max_length: int
    too_long: str = "reject"  # or "truncate" (text only, never image tokens)
    image_aspect_ratio: str = "pad"  # or "square" (the processor's resize + centre crop)
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS


OUTPUT_COLUMNS = ("id", "source", "index", "reason", "detail", "input_ids", "labels", "pixel_values", "num_images",
                  "length", "num_supervised")


class RowPreparer:
    def __init__(self, vision_path: str, llm_path: str, settings: dict):
        from transformers import AutoConfig, AutoImageProcessor

        from llava_core.model.build import IMAGE_TOKEN, image_seq_length, load_tokenizer_with_image_token

        self.settings = RowSettings(**settings)
        self.tokenizer = load_tokenizer_with_image_token(llm_path)
        self.image_processor = AutoImageProcessor.from_pretrained(vision_path)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_seq_length = image_seq_length(AutoConfig.from_pretrained(vision_path))
        self.pad_fill = images.mean_colour(self.image_processor)

    def __call__(self, batch: dict) -> dict:
        """Ray Data batch in (`source`, `index`, `raw` JSON) -> one output row per input row, good or rejected."""
        out = {name: [] for name in OUTPUT_COLUMNS}
        for source, index, raw in zip(batch["source"], batch["index"], batch["raw"]):
            example = self.prepare(json.loads(raw))
            example.update(source=str(source), index=int(index))
            for name in OUTPUT_COLUMNS:
                out[name].append(example[name])
        return out

    def prepare(self, row: dict) -> dict:
        row_id = str(row.get("id", ""))
        try:
            return {"id": row_id, "reason": "", "detail": "", **self._example(row)}
        except RowError as error:
            return {"id": row_id, "reason": error.reason, "detail": error.detail[:500], "input_ids": [],
                    "labels": [], "pixel_values": b"", "num_images": 0, "length": 0, "num_supervised": 0}

    def _example(self, row: dict) -> dict:
        s = self.settings
        names = formats.image_list(row)
        turns = formats.normalise_conversation(row, len(names))
        rendered = templates.render(s.template, turns, self.tokenizer.eos_token)
        ids, labels = templates.tokenize_with_labels(rendered, self.tokenizer)
        ids, labels = templates.expand_image_tokens(ids, labels, self.image_token_id, self.image_seq_length)
        ids, labels = templates.fit_to_length(ids, labels, s.max_length, self.image_token_id, s.too_long)
        num_supervised = int((labels != templates.IGNORE_INDEX).sum())
        if num_supervised == 0:
            raise RowError("nothing_supervised", "no assistant tokens to learn")
        pixels = self._pixels([images.read_image_bytes(s.image_folder, n) for n in names])
        return {"input_ids": ids.astype(np.int32).tolist(), "labels": labels.astype(np.int32).tolist(),
                "pixel_values": pixels, "num_images": len(names), "length": len(ids), "num_supervised": num_supervised}

    def _pixels(self, encoded: list[bytes]) -> bytes:
        """float32 pixel tensors, (num_images, 3, H, W), as raw bytes; empty for text-only rows."""
        if not encoded:
            return b""
        decoded = [images.decode_image(data, self.settings.max_image_pixels) for data in encoded]
        if self.settings.image_aspect_ratio == "pad":
            decoded = [images.pad_to_square(image, self.pad_fill) for image in decoded]
        pixel_values = self.image_processor(images=decoded, return_tensors="np")["pixel_values"]
        return np.ascontiguousarray(pixel_values, dtype=np.float32).tobytes()
