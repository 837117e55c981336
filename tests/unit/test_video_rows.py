"""LLaVA-OneVision video rows from a file (or a frame list) to the model: sampling gives exactly the frames asked for,
the stored `<video>` token count is the processor's own expansion and what the model fills, bad videos are rejected
with their reasons, a micro-batch mixing image, video and text rows runs, and the engine answers a video as
`generate` does (the live endpoint: tests/integration/test_video_rows.py).

No Ray: `RowPreparer`, `collate`, the protocol parser and `GenerationEngine` are called directly, on the stand-in
towers and test clips of tests/video_rows_helpers.py."""
import io
import json
import os
import time

import av
import numpy as np
import pyarrow as pa
import pytest
import torch

from llava_core.config import ServeSettings
from llava_core.data import video
from llava_core.data.image_layouts import TilePixels, stored_pixels
from llava_core.data.images import ImageLimits
from llava_core.data.rows import OUTPUT_SCHEMA
from llava_core.inference.decoding import DecodingParams
from llava_core.inference.engine import GenerationEngine, GenerationRequest
from llava_core.model import processors
from llava_core.serve.errors import ApiError
from llava_core.train.batching import collate, collate_packed
from tests.video_rows_helpers import FRAMES, TILE, checked, colour, data_url, mp4_bytes, png, preparer_for, video_body


def all_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


# --- sampling -----------------------------------------------------------------------------------------------------


def test_uniform_sampling_spreads_over_the_clip_and_repeats_a_short_one():
    assert video.uniform_indices(20, 8).tolist() == [0, 3, 5, 8, 11, 14, 16, 19]
    assert video.uniform_indices(5, 8).tolist() == [0, 1, 1, 2, 2, 3, 3, 4]
    assert video.uniform_indices(1, 4).tolist() == [0, 0, 0, 0]
    times = np.arange(20) / 10  # 2 s at 10 fps
    assert video.sample_times(times, video.VideoSampling(frames=8)).tolist() == [0, 3, 5, 8, 11, 14, 16, 19]


def test_fps_sampling_takes_candidates_every_1_over_fps_seconds_then_exactly_the_frames_asked_for():
    times = np.arange(20) / 10
    # 5 fps: candidates 0, 2, ..., 18 (10 of them), down-sampled to 4
    assert video.sample_times(times, video.VideoSampling(frames=4, fps=5)).tolist() == [0, 6, 12, 18]
    # 1 fps: candidates at 0 s and 1 s, up-sampled to 4 by repeating
    assert video.sample_times(times, video.VideoSampling(frames=4, fps=1)).tolist() == [0, 0, 10, 10]
    # faster than the clip: every candidate is a real frame, the count is exact, the order kept
    picked = video.sample_times(times, video.VideoSampling(frames=6, fps=40))
    assert len(picked) == 6 and picked[0] == 0 and picked[-1] == 19 and (np.diff(picked) >= 0).all()


def test_a_decoded_clip_gives_exactly_the_frames_asked_for_in_order():
    frames = video.decode_video(mp4_bytes(), video.VideoSampling(frames=32), ImageLimits())
    assert len(frames) == 32 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    expected = [colour(i) for i in video.uniform_indices(20, 32)]  # 20 frames: some repeat
    measured = [tuple(f.reshape(-1, 3).mean(axis=0)) for f in frames]
    np.testing.assert_allclose(measured, expected, atol=10)  # mpeg4 is lossy


def test_seeking_decodes_the_same_frames_as_decoding_everything():
    """A 30 s clip with a keyframe every 12 frames: the sampled frames found by seeking are bit-identical to those
    of a full decode, and cost a fraction of it (the timings are printed for the report)."""
    data = mp4_bytes(frames=720, width=160, height=120, fps=24, gop=12)
    started = time.perf_counter()
    everything = all_frames(data)
    full_ms = (time.perf_counter() - started) * 1000
    for sampling in (video.VideoSampling(frames=32), video.VideoSampling(frames=8, fps=0.5)):
        started = time.perf_counter()
        sampled = video.decode_video(data, sampling, ImageLimits())
        sampled_ms = (time.perf_counter() - started) * 1000
        times = np.arange(len(everything)) / 24
        for frame, k in zip(sampled, video.sample_times(times, sampling).tolist()):
            np.testing.assert_array_equal(frame, everything[k])
        print(f"{sampling}: {sampled_ms:.0f} ms sampled vs {full_ms:.0f} ms for all {len(everything)} frames")


# --- prepare ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> str:
    """An image folder with a clip, its frames as images, an image, and broken videos."""
    folder = tmp_path_factory.mktemp("video_media")
    (folder / "clips").mkdir()
    (folder / "frames").mkdir()
    (folder / "clips" / "a.mp4").write_bytes(mp4_bytes())
    (folder / "clips" / "corrupt.mp4").write_bytes(b"not a video at all, just text " * 20)
    (folder / "clips" / "empty.mp4").write_bytes(b"")
    for i in range(5):
        (folder / "frames" / f"f{i}.png").write_bytes(png((48, 64), colour(i)))
    (folder / "a.png").write_bytes(png((90, 200), (200, 30, 30)))
    return str(folder)


def row(medium: dict, question: str = "<video>\nWhat happens in the video?", answer: str = "It fades.") -> dict:
    return {"id": "r", **medium, "conversations": [{"from": "human", "value": question},
                                                   {"from": "gpt", "value": answer}]}


VIDEO_ROW = row({"video": "clips/a.mp4"}, "<image>\nWhat happens in the video?")  # LLaVA-NeXT writes <image>
FRAME_ROW = row({"video": [f"frames/f{i}.png" for i in range(5)]})
IMAGE_ROW = row({"image": "a.png"}, "<image>\nWhat colour is it?", "red")
TEXT_ROW = row({}, "What colour is red?", "red")
COLUMNS = ("input_ids", "labels", "pixel_values", "images", "image_sizes", "image_tokens", "video", "video_tokens",
           "num_images", "length")


def prepared_table(preparer, rows, folder) -> pa.Table:
    examples = [preparer.prepare(r, folder) for r in rows]
    assert [e["reason"] for e in examples] == [""] * len(examples), [e["detail"] for e in examples]
    return pa.table({n: [e[n] for e in examples] for n in COLUMNS},
                    schema=pa.schema([OUTPUT_SCHEMA.field(n) for n in COLUMNS]))


def stored_frames(example: dict) -> np.ndarray:
    """A row's stored video as (frames, tile, tile, 3) uint8, the layout a processor takes frames in."""
    uint8 = np.frombuffer(example["video"]["uint8"], dtype=np.uint8).reshape(-1, 3, TILE, TILE)
    return np.moveaxis(uint8, 1, -1)


def test_a_video_row_stores_the_processors_token_count_and_its_frames(video_onevision, media):
    model, processor, preparer = video_onevision
    video_id = model.config.video_token_id
    for raw in (VIDEO_ROW, FRAME_ROW):
        example = preparer.prepare(raw, media)
        assert example["reason"] == "", example["detail"]
        ids = np.asarray(example["input_ids"])
        assert example["video_tokens"] == FRAMES * 4 + 1 == processors.video_token_count(processor, FRAMES, TILE, TILE)
        assert (ids == video_id).sum() == example["video_tokens"] and example["length"] == len(ids)
        assert example["modality"] == "video" and example["num_images"] == 1 and example["image_tokens"] == []
        assert len(example["video"]["uint8"]) == FRAMES * 3 * TILE * TILE  # 24,576 bytes at this size
        # The processor's own expansion of the same prompt and frames: the same number of video tokens.
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}],
            add_generation_prompt=True)
        frames = stored_frames(example)
        expanded = processor(text=[prompt], videos=[frames], return_tensors="pt")
        assert int((expanded["input_ids"] == video_id).sum()) == example["video_tokens"]
        # What the trainer makes of the stored uint8 is what serving's processor makes of the same frames.
        served = expanded["pixel_values_videos"][0].numpy()
        trained = stored_pixels(example["video"], (3, TILE, TILE))
        np.testing.assert_allclose(trained, served, atol=1e-6, rtol=0)
    # The frame list repeats its 5 frames uniformly: stored frame k is frame uniform_indices(5, 8)[k], squashed.
    frames = stored_frames(preparer.prepare(FRAME_ROW, media))
    expected = [colour(i) for i in video.uniform_indices(5, FRAMES)]
    np.testing.assert_allclose(frames.reshape(FRAMES, -1, 3).mean(axis=1), expected, atol=1)


def test_video_rows_collate_into_pixel_values_videos_the_model_accepts(video_onevision, media):
    model, processor, preparer = video_onevision
    table = prepared_table(preparer, [VIDEO_ROW, FRAME_ROW], media)
    pixels = TilePixels(processor, "llava_onevision")
    assert pixels.columns == ("images", "video")
    batch = collate(table, np.arange(2), processor.tokenizer.pad_token_id, pixels)
    assert batch["pixel_values"] is None and batch["pixel_values_videos"].shape == (2, FRAMES, 3, TILE, TILE)
    assert pixels.views(batch) == 2 * FRAMES
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss
    assert torch.isfinite(loss) and loss > 0


def test_a_micro_batch_of_an_image_a_video_and_text_runs_each_sample_with_its_own_pixels(video_onevision, media):
    model, processor, preparer = video_onevision
    table = prepared_table(preparer, [IMAGE_ROW, VIDEO_ROW, TEXT_ROW], media)
    pixels = TilePixels(processor, "llava_onevision")
    pad = processor.tokenizer.pad_token_id
    batch = collate(table, np.arange(3), pad, pixels)
    assert batch["pixel_values"].shape[0] == 1 and batch["pixel_values_videos"].shape[:2] == (1, FRAMES)
    image_views = pixels.views({k: v for k, v in batch.items() if k != "pixel_values_videos"})
    assert pixels.views(batch) == image_views + FRAMES
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        assert torch.isfinite(out.loss)
        for k in range(3):  # alone, each sample's logits are the same: its pixels landed in its own tokens
            alone = collate(table, np.array([k]), pad, pixels)
            inputs = {key: v for key, v in alone.items() if v is not None}
            n = int(alone["attention_mask"].sum())
            torch.testing.assert_close(out.logits[k, :n], model(**inputs, use_cache=False).logits[0, :n],
                                       atol=2e-4, rtol=1e-4)
        packed = collate_packed(table, [np.array([0, 1]), np.array([2])], pad, pixels)
        assert packed["pixel_values_videos"].shape[:2] == (1, FRAMES)
        assert torch.isfinite(model(**packed, use_cache=False).loss)


def test_the_preparer_writes_video_and_other_rows_in_the_shard_schema(video_onevision, media):
    _, _, preparer = video_onevision
    raws = [VIDEO_ROW, TEXT_ROW, row({"video": "clips/corrupt.mp4"})]
    staged = pa.table({"source": ["s"] * 3, "image_folder": [media] * 3, "index": [0, 1, 2],
                       "raw": [json.dumps(r) for r in raws], "image_bytes": [[], [], []], "defect": [None] * 3},
                      schema=pa.schema([("source", pa.string()), ("image_folder", pa.string()), ("index", pa.int64()),
                                        ("raw", pa.string()), ("image_bytes", pa.list_(pa.binary())),
                                        ("defect", pa.string())]))
    out = preparer(staged)
    assert out.schema == OUTPUT_SCHEMA
    assert out.column("status").to_pylist() == ["written", "written", "rejected"]
    assert out.column("video_tokens").to_pylist() == [FRAMES * 4 + 1, 0, 0]
    assert [len(v["uint8"]) for v in out.column("video").to_pylist()] == [FRAMES * 3 * TILE * TILE, 0, 0]
    assert out.column("modality").to_pylist()[:2] == ["video", "text"]


@pytest.mark.parametrize("medium, reason", [
    ({"video": "clips/none.mp4"}, "video_missing"),
    ({"video": "clips/corrupt.mp4"}, "video_unreadable"),
    ({"video": "clips/empty.mp4"}, "video_empty"),
    ({"video": "../outside.mp4"}, "video_path_outside_folder"),
    ({"video": "/etc/passwd"}, "video_path_outside_folder"),
    ({"video": {"path": "clips/a.mp4"}}, "video_missing"),
    ({"video": "clips/a.mp4", "image": "a.png"}, "video_with_images"),
    ({"video": ["frames/f0.png", "frames/nope.png"]}, "image_missing"),
])
def test_bad_videos_are_rejected_with_their_reasons(video_onevision, media, medium, reason):
    _, _, preparer = video_onevision
    example = preparer.prepare(row(medium), media)
    assert example["reason"] == reason, example["detail"]
    assert example["video"]["uint8"] == b"" and example["video_tokens"] == 0 and example["input_ids"] == []


def test_an_oversized_video_is_refused_from_its_size_and_other_families_take_no_video(video_base_models, media):
    small = preparer_for(video_base_models, max_video_bytes=1000)
    assert small.prepare(VIDEO_ROW, media)["reason"] == "video_too_large"
    assert preparer_for(video_base_models, "llava_next").prepare(VIDEO_ROW, media)["reason"] == "video_unsupported"


def test_a_video_tag_without_a_video_is_rejected(video_onevision, media):
    _, _, preparer = video_onevision
    assert preparer.prepare(row({}, "<video>\nWhat happens?"), media)["reason"] == "image_tag_mismatch"
    assert preparer.prepare(row({"video": "clips/a.mp4"}, "<video><video> twice?"), media)["reason"] == \
        "image_tag_mismatch"


# --- serving ------------------------------------------------------------------------------------------------------


def test_a_video_url_data_url_becomes_sampled_frames():
    chat, images, videos = checked(video_body(data_url(mp4_bytes())), ServeSettings(video_frames=FRAMES))
    assert images == [] and len(videos) == 1 and len(videos[0]) == FRAMES
    assert videos[0][0].shape == (48, 64, 3)
    assert chat.template_messages()[0]["content"] == [{"type": "video"},
                                                      {"type": "text", "text": "What happens in the video?"}]


@pytest.mark.parametrize("body, settings, takes_videos, code", [
    (video_body(data_url(b"definitely not a video" * 10)), ServeSettings(), True, "invalid_video"),
    (video_body(data_url(mp4_bytes())), ServeSettings(max_video_bytes=500), True, "video_too_large"),
    (video_body("data:image/png;base64,AAAA"), ServeSettings(), True, "invalid_video_url"),
    (video_body(data_url(mp4_bytes())), ServeSettings(), False, "video_not_supported"),
    (video_body("https://videos.example.test/a.mp4"), ServeSettings(), True, "video_host_not_allowed"),
])
def test_bad_video_requests_are_400s_with_a_reason(body, settings, takes_videos, code):
    with pytest.raises(ApiError) as caught:
        checked(body, settings, takes_videos)
    assert caught.value.status == 400 and caught.value.code == code, caught.value.message


def test_too_many_videos_and_a_typed_video_tag_are_refused():
    body = video_body(data_url(mp4_bytes()))
    body["messages"][0]["content"].append(body["messages"][0]["content"][0])
    with pytest.raises(ApiError, match="too many videos"):
        checked(body, ServeSettings())
    typed = {"model": "m", "messages": [{"role": "user", "content": "what is <video>?"}]}
    with pytest.raises(ApiError, match="video_url"):
        checked(typed, ServeSettings())
    assert checked(typed, ServeSettings(), takes_videos=False)[2] == []


def test_the_engine_answers_a_video_as_generate_does_on_the_same_inputs(video_export):
    from transformers import LlavaOnevisionForConditionalGeneration

    engine = GenerationEngine(video_export, device="cpu")
    chat, _, videos = checked(video_body(data_url(mp4_bytes())), ServeSettings(video_frames=FRAMES))
    messages = chat.template_messages()
    prompt_tokens = engine.count_prompt_tokens(messages, [], videos)
    assert engine.count_image_tokens([], videos) == FRAMES * 4 + 1
    request = GenerationRequest(messages, [], DecodingParams(max_tokens=5, temperature=0), videos=videos)
    completion = engine.generate([request])[0]
    assert completion.prompt_tokens == prompt_tokens

    # Plain transformers: the model as saved, the prompt and pixel_values_videos built directly from the frames.
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(video_export).eval()
    processor = processors.load_processor(video_export, "llava_onevision")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], videos=[np.stack(videos[0])], return_tensors="pt")
    assert inputs["input_ids"].shape[1] == prompt_tokens
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert completion.text == expected.strip() and completion.completion_tokens >= 1  # answers are served stripped


# --- settings -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("prepare.video_frames=0", "prepare.video_frames"), ("prepare.max_video_bytes=0", "prepare.max_video_bytes"),
    ("prepare.video_fps=-1", "prepare.video_fps"), ("serve.max_videos=0", "serve.max_videos"),
    ("serve.video_frames=0", "serve.video_frames"), ("serve.max_video_bytes=0", "serve.max_video_bytes"),
])
def test_video_settings_must_be_positive(override, message):
    from llava_core.config import WorkflowError, load_workflow

    quickstart = os.path.join(os.path.dirname(__file__), "..", "..", "workflows", "quickstart.yaml")
    assert load_workflow(quickstart, ["prepare.video_fps=2.5"]).prepare.video_fps == 2.5
    with pytest.raises(WorkflowError, match=message):
        load_workflow(quickstart, [override])
