"""Turn one raw LLaVA row into one training example (or a rejection with a reason).

`RowPreparer` is the per-row work of the prepare stage; Ray Data runs it in a pool of actors (it holds a tokenizer and
an image processor), and benchmarks and tests call it directly. How the images are stored depends on the model
family (`image_layouts`: uint8 crops for LLaVA-1.5, encoded images with their exact token counts for the AnyRes
families, and for OneVision's video rows the sampled frames as uint8); docs/data.md's "What a shard holds" explains them
(the measurements: docs/results.md).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from llava_core.data import formats, images, preference, templates, video
from llava_core.data.formats import RowError
from llava_core.data.image_layouts import NO_VIDEO, shard_images, shard_videos
from llava_core.schema import FAMILY_LAYOUTS, PrepareSettings, section


@section(kw_only=True)
class RowSettings(PrepareSettings):
    """How one raw row becomes an example: the workflow's `prepare` settings (defined there, once), with its dataset's
    template and the model's family. An empty `image_aspect_ratio` is the family's own layout."""
    template: str
    family: str = "llava"  # the model family: which processor, image layout and shard format
    image_folder: str = ""  # the default for rows whose staged `image_folder` is empty
    kind: str = "conversations"  # the dataset's: `preference` rows become pairs (`data/preference.py`)
    checkpoint: str = ""  # the model the dataset's stage starts from, whose own processor prepares it ("": a new one)

    @property
    def layout(self) -> str:
        return self.image_aspect_ratio or FAMILY_LAYOUTS[self.family]

    @property
    def image_limits(self) -> images.ImageLimits:
        return images.ImageLimits.of(self)

    @property
    def video_sampling(self) -> video.VideoSampling:
        return video.VideoSampling.of(self, self.video_fps)


PIXELS_TYPE = pa.struct([
    ("uint8", pa.binary()),  # (num_images, 3, H, W) uint8, C order; empty for text-only rows
    ("scale", pa.list_(pa.float32())),  # per channel: float pixel = uint8 * scale + offset
    ("offset", pa.list_(pa.float32())),
])
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("index", pa.int64()), ("reason", pa.string()),
    ("detail", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("pixel_values", PIXELS_TYPE),  # crops (llava); empty for the tile format
    ("images", pa.list_(pa.binary())),  # tiles (llava_next, llava_onevision): each image's encoded bytes
    ("image_sizes", pa.list_(pa.list_(pa.int32()))),  # tiles: each image's (height, width) as decoded
    ("image_tokens", pa.list_(pa.int32())),  # the exact <image> tokens each image expands to, in `input_ids`
    ("video", PIXELS_TYPE),  # OneVision video rows: the sampled frames (frames, 3, tile, tile) uint8; else empty
    ("video_tokens", pa.int32()),  # the <video> tokens the video expands to, in `input_ids`; 0 without one
    # preference pairs: `input_ids` / `labels` hold the chosen answer after the prompt, these the rejected one after
    # the same prompt (and media); empty for conversation rows
    ("rejected_input_ids", pa.list_(pa.int32())), ("rejected_labels", pa.list_(pa.int32())),
    # the images, or 1 for a video row: the plan groups rows with pixels by it (modality_grouped, text_only_rows)
    # `length`: the row's tokens; a pair's two sequences together (what it costs a step)
    ("num_images", pa.int32()), ("length", pa.int32()),
    ("num_supervised", pa.int32()), ("modality", pa.string()),
    ("status", pa.string()),  # written | rejected: the pipeline partitions its one streaming write by it
])
OUTPUT_COLUMNS = tuple(OUTPUT_SCHEMA.names)
# Rows per parquet row group in the shards. The trainer reads rows at random, and a read costs its whole row group:
# a 336 px image is 3 x 336 x 336 = 338,688 bytes as uint8, so 8 rows is ~2.7 MB read for one wanted row (~0.34 MB
# if rows were read one by one, but then each request is small and the footer grows). Reading the plan's small
# columns (length, num_images) costs one small range per group: 83K ranges for LLaVA-1.5's 665K rows, paid once
# by prepare's plan index (data/plan_index.py), not by every rank.
ROW_GROUP_ROWS = 8


class RowPreparer:
    def __init__(self, vision_path: str, llm_path: str, settings: RowSettings | dict):
        """`settings`: a RowSettings, or a mapping of its fields (tests and benchmarks name only what they change)."""
        self.settings = s = settings if isinstance(settings, RowSettings) else RowSettings(**settings)
        self.images = shard_images(vision_path, llm_path, s.family, s.layout, s.template, s.image_limits,
                                   s.checkpoint)
        self.videos = shard_videos(self.images, s.family, s.video_sampling, s.image_limits)  # None: no video
        self.tokenizer = self.images.tokenizer
        self.image_token_id = self.images.image_token_id
        self.media_token_ids = (self.image_token_id,) + ((self.videos.video_token_id,) if self.videos else ())

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Staged rows (`source`, `image_folder`, `index`, `raw`, `image_bytes`, `defect`) -> one output row per input
        row, good or rejected (Ray Data `batch_format="pyarrow"`)."""
        out = {name: [] for name in OUTPUT_COLUMNS}
        names = ("source", "image_folder", "index", "raw", "image_bytes", "defect")
        columns = [batch.column(c).to_pylist() for c in names]
        for source, image_folder, index, raw, inline, defect in zip(*columns):
            example = self.prepare(raw, image_folder or self.settings.image_folder, inline or [], defect)
            example.update(source=source, index=index, status="rejected" if example["reason"] else "written")
            for name in OUTPUT_COLUMNS:
                out[name].append(example[name])
        return pa.table(out, schema=OUTPUT_SCHEMA)

    def prepare(self, raw: str | dict, image_folder: str = "", inline: list | None = None,
                defect: str | None = None) -> dict:
        """One row (JSON text or parsed) -> a training example, or a rejection with its reason. `defect` is the
        reader's verdict on a row that is not a JSON object (`sources.SourceRow`): a `malformed_row`."""
        row_id = ""
        try:
            if defect:
                raise RowError("malformed_row", defect)
            row = _parse_row(raw)
            row_id = str(row.get("id", ""))
            return {"id": row_id, "reason": "", "detail": "",
                    **self._example(row, image_folder or self.settings.image_folder, inline or [])}
        except Exception as error:  # noqa: BLE001
            # One odd row must not kill a 665K-row job: anything unforeseen is a counted, reported reject too
            # (`unexpected_error` with the exception), and the reject threshold still stops a run that is all errors.
            if not isinstance(error, RowError):
                error = RowError("unexpected_error", f"{type(error).__name__}: {error}")
            return {"id": row_id, "reason": error.reason, "detail": error.detail[:500], "input_ids": [],
                    "labels": [], **NO_PAIR, **self.images.columns(), **NO_VIDEO, "image_tokens": [], "num_images": 0,
                    "length": 0, "num_supervised": 0, "modality": ""}

    def _example(self, row: dict, image_folder: str, inline: list) -> dict:
        if self.settings.kind == "preference":
            return self._pair(row, image_folder, inline)
        s = self.settings
        names, clip = formats.image_list(row), formats.video_of(row)
        self._check_video(clip)
        turns = formats.normalise_conversation(row, len(names), video=clip is not None)
        rendered = templates.render(s.template, turns, self.tokenizer)
        ids, labels = templates.tokenize_with_labels(rendered, self.tokenizer)
        prepared = self._images(names, image_folder, inline)
        ids, labels = templates.expand_image_tokens(ids, labels, self.image_token_id, prepared.token_counts)
        if self.videos is not None:  # also where a `<video>` typed into a row without one is found
            clip = self._video(clip, image_folder)
            ids, labels = templates.expand_image_tokens(ids, labels, self.videos.video_token_id,
                                                        [clip.token_count] if clip else [], "video")
        ids, labels = templates.fit_to_length(ids, labels, s.max_length, self.media_token_ids, s.too_long)
        num_supervised = int((labels != templates.IGNORE_INDEX).sum())
        if num_supervised == 0:
            raise RowError("nothing_supervised", "no assistant tokens to learn")
        return {"input_ids": ids.astype(np.int32).tolist(), "labels": labels.astype(np.int32).tolist(), **NO_PAIR,
                **_media_columns(prepared, clip), "num_images": len(names) or int(clip is not None),
                "length": len(ids), "num_supervised": num_supervised,
                "modality": "video" if clip else "image" if names else "text"}

    def _pair(self, row: dict, image_folder: str, inline: list) -> dict:
        """A preference row: both answers after the same prompt and media (`preference.tokenize_pair`); never
        truncated, whatever `too_long` says (a cut answer is not the answer that was judged)."""
        s = self.settings
        pair = preference.read_preference_row(row)
        self._check_video(pair.video)
        prepared = self._images(pair.images, image_folder, inline)
        clip = self._video(pair.video, image_folder) if pair.video is not None else None
        media = ((self.videos.video_token_id, [clip.token_count], "video") if clip
                 else (self.image_token_id, prepared.token_counts, "image"))
        tokens = preference.tokenize_pair(pair, s.template, self.tokenizer, media[0], media[1], s.max_length,
                                          media[2])
        supervised = sum(int((labels != templates.IGNORE_INDEX).sum())
                         for labels in (tokens.chosen_labels, tokens.rejected_labels))
        return {"input_ids": tokens.chosen_ids.astype(np.int32).tolist(),
                "labels": tokens.chosen_labels.astype(np.int32).tolist(),
                "rejected_input_ids": tokens.rejected_ids.astype(np.int32).tolist(),
                "rejected_labels": tokens.rejected_labels.astype(np.int32).tolist(),
                **_media_columns(prepared, clip), "num_images": len(pair.images) or int(clip is not None),
                "length": len(tokens.chosen_ids) + len(tokens.rejected_ids), "num_supervised": supervised,
                "modality": "video" if clip else "image" if pair.images else "text"}

    def _check_video(self, clip) -> None:
        if clip is not None and self.videos is None:
            raise RowError("video_unsupported",
                           f"model family {self.settings.family} takes no videos (llava_onevision does)")

    def _images(self, names: list[str], image_folder: str, inline: list):
        """The row's images read (inline bytes first) and decoded: a bad one is this row's reject."""
        encoded = [inline[i] if i < len(inline) and inline[i] is not None
                   else images.read_image_bytes(image_folder, name, self.settings.allow_paths_outside_image_folder)
                   for i, name in enumerate(names)]
        return self.images.prepare(encoded)

    def _video(self, clip, image_folder: str):
        """The row's video decoded and sampled, after the cheap checks: a bad one is this row's reject."""
        return self.videos.prepare(image_folder, clip, self.settings.allow_paths_outside_image_folder) if clip else None


NO_PAIR = {"rejected_input_ids": [], "rejected_labels": []}


def _media_columns(prepared, clip) -> dict:
    return {**prepared.columns, **(clip.columns if clip else NO_VIDEO), "image_tokens": prepared.token_counts}


def _parse_row(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        row = json.loads(raw)
    except (TypeError, ValueError) as error:
        raise RowError("malformed_row", f"not JSON: {error}") from error
    if not isinstance(row, dict):
        raise RowError("malformed_row", f"a row must be a JSON object, got {type(row).__name__}")
    return row
