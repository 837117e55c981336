"""LLaVA-NeXT and LLaVA-OneVision rows from prepare to the model: the token counts prepare stores are the ones the
processor writes into a prompt and the features the model makes, for single images of many sizes, several-image rows
(OneVision: base views only), text-only rows and packed rows; and a trained step moves `image_newline`.

No Ray: `RowPreparer` and `collate` are called directly, on the stand-in towers at tiny tile sizes."""
import io
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from llava_core.data.image_layouts import TilePixels, tile_side
from llava_core.data.rows import OUTPUT_SCHEMA, RowPreparer
from llava_core.model import build, families
from llava_core.quickstart import standins
from llava_core.train.batching import collate, collate_packed
from llava_core.train.engine import with_blank_image_row

HUB = {"llava_next": ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5", "vicuna_v1"),
       "llava_onevision": ("google/siglip-so400m-patch14-384", "Qwen/Qwen2-7B-Instruct", "chat_template")}
SIZES = [(40, 30), (90, 200), (64, 64), (300, 70), (17, 150)]  # (height, width)


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("anyres_hub"))
    corpus = ["What colour is the shape?", "red", "Which image shows it?", "first", "second"] * 10
    cfg = standins.TinyModelConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, llm_hidden=64,
                                   llm_layers=1, llm_heads=4, vocab_size=400)
    paths = {}
    for name, (tower, llm, _) in HUB.items():
        paths[name] = (os.path.join(root, name, "vision"), os.path.join(root, name, "llm"))
        standins.save_standin(tower, paths[name][0], corpus, cfg)
        standins.save_standin(llm, paths[name][1], corpus, cfg)
    return paths


def png(size, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size[::-1], colour).save(buffer, format="PNG")
    return buffer.getvalue()


def rows_for(sizes_per_row) -> tuple[list[dict], list[list[bytes]]]:
    rows, inline = [], []
    for k, sizes in enumerate(sizes_per_row):
        question = "<image>\n" * len(sizes) + ("Which image shows it?" if len(sizes) > 1 else "What colour is it?")
        rows.append({"id": f"r{k}", "image": [f"{k}_{i}.png" for i in range(len(sizes))] if sizes else None,
                     "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]})
        inline.append([png(size) for size in sizes])
    return rows, inline


def prepared_table(preparer, sizes_per_row) -> pa.Table:
    rows, inline = rows_for(sizes_per_row)
    examples = [preparer.prepare(row, "", images) for row, images in zip(rows, inline)]
    assert [e["reason"] for e in examples] == [""] * len(examples), [e["detail"] for e in examples]
    columns = {name: [e.get(name) for e in examples] for name in ("input_ids", "labels", "pixel_values", "images",
                                                                   "image_sizes", "image_tokens", "video",
                                                                   "video_tokens", "num_images", "length")}
    return pa.table(columns, schema=pa.schema([OUTPUT_SCHEMA.field(n) for n in columns]))


@pytest.fixture(scope="module", params=list(HUB))
def family_setup(request, base_models):
    name = request.param
    vision, llm = base_models[name]
    template = HUB[name][2]
    torch.manual_seed(0)
    model, processor = build.assemble(name, vision, llm, template=template)
    settings = {"template": template, "max_length": 4096, "family": name,
                "image_aspect_ratio": families.family(name).image_layout}
    return name, model.eval(), processor, RowPreparer(vision, llm, settings)


def test_stored_counts_are_what_the_processor_writes_and_the_model_fills(family_setup):
    name, model, processor, preparer = family_setup
    table = prepared_table(preparer, [[s] for s in SIZES] + [[(40, 30), (90, 200)], []])
    image_id = model.config.image_token_id
    for row in table.to_pylist():
        ids = np.asarray(row["input_ids"])
        assert (ids == image_id).sum() == sum(row["image_tokens"]) and row["length"] == len(ids)
        assert row["image_sizes"] == [list(s) for s in ([(r.height, r.width) for r in map(
            lambda b: Image.open(io.BytesIO(b)), row["images"])])]
        if not row["images"]:
            continue
        # The processor's own expansion of the same prompt and images: the same number of image tokens.
        content = [{"type": "image"}] * len(row["images"]) + [{"type": "text", "text": "hi"}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in row["images"]]
        expanded = processor(images=[pictures], text=[prompt], return_tensors="pt")
        assert int((expanded["input_ids"] == image_id).sum()) == sum(row["image_tokens"])
    several = table.to_pylist()[len(SIZES)]["image_tokens"]
    if name == "llava_onevision":  # base view + one newline each
        assert several == [processor.num_image_tokens + 1] * 2
    else:  # LLaVA-NeXT tiles every image
        assert several == [table.to_pylist()[0]["image_tokens"][0], table.to_pylist()[1]["image_tokens"][0]]


def test_collated_rows_run_through_the_model_with_their_own_features(family_setup):
    """The model raises when image tokens and features differ; each sample's loss alone equals its loss in the
    batch (its images landed in its own tokens), and packed rows give the same per-sample losses."""
    name, model, processor, preparer = family_setup
    table = prepared_table(preparer, [[SIZES[1]], [(40, 30), (90, 200)], [], [SIZES[3]]])
    pixels = TilePixels(processor, name)
    with torch.no_grad():
        batch = collate(table, np.arange(4), processor.tokenizer.pad_token_id, pixels)
        if name == "llava_onevision":
            assert batch["batch_num_images"].tolist() == [1, 2, 1]
        several = [1, 1] if name == "llava_onevision" else [_views(processor, s) for s in [(40, 30), (90, 200)]]
        assert pixels.views(batch) == _views(processor, SIZES[1]) + sum(several) + _views(processor, SIZES[3])
        logits = model(**batch, use_cache=False).logits
        for k in range(4):
            alone = collate(table, np.array([k]), processor.tokenizer.pad_token_id, pixels)
            inputs = {key: v for key, v in alone.items() if v is not None}
            n = int(alone["attention_mask"].sum())
            alone_logits = model(**inputs, use_cache=False).logits[0, :n]
            torch.testing.assert_close(logits[k, :n], alone_logits, atol=2e-4, rtol=1e-4)
        packed = collate_packed(table, [np.array([0, 1]), np.array([2, 3])], processor.tokenizer.pad_token_id,
                                pixels)
        assert model(**packed, use_cache=False).logits.shape[0] == 2


def _views(processor, size) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tile = tile_side(processor.image_processor)
    return image_size_to_num_patches(size, processor.image_processor.image_grid_pinpoints, tile)


def test_a_text_only_batch_runs_a_blank_image_and_image_newline_trains(family_setup):
    name, model, processor, preparer = family_setup
    table = prepared_table(preparer, [[], []])
    pixels = TilePixels(processor, name)
    batch = collate(table, np.arange(2), processor.tokenizer.pad_token_id, pixels)
    assert batch["pixel_values"] is None
    blank = with_blank_image_row(batch, model.config.image_token_id, pixels.blank(), processor.tokenizer.pad_token_id)
    model.train()
    model.zero_grad()
    loss = model(**blank, use_cache=False).loss
    loss.backward()
    model.eval()
    plain = model(**{k: v for k, v in batch.items() if v is not None}, use_cache=False).loss
    torch.testing.assert_close(loss.detach(), plain.detach(), atol=1e-5, rtol=1e-5)
    # In the graph (ZeRO ranks stay in step) with zero weight: the blank row has no labels.
    assert model.model.image_newline.grad is not None and torch.count_nonzero(model.model.image_newline.grad) == 0

    image_batch = collate(prepared_table(preparer, [[SIZES[1]]]), np.arange(1), processor.tokenizer.pad_token_id,
                          pixels)
    model.zero_grad()
    model(**image_batch, use_cache=False).loss.backward()
    assert torch.count_nonzero(model.model.image_newline.grad) > 0  # a tiled image's row ends feed the answer
