"""Sequence packing: a packed row gives every sample exactly the logits and loss it gets alone.

transformers 5.x builds a block-diagonal causal mask when `position_ids` restart inside a row and no
`attention_mask` is passed (`masking_utils.find_packed_sequence_indices`); this checks it for sdpa and eager, with
images staying with their own samples and a text-only sample in between.
"""
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from llava_core.data.image_layouts import CropPixels
from llava_core.model.build import assemble
from llava_core.train.batching import collate_packed


def sample_table(model, processor, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_image, image_id = model.config.image_seq_length, model.config.image_token_index
    size = processor.image_processor.crop_size["height"]
    rows = {"input_ids": [], "labels": [], "pixel_values": [], "num_images": [], "length": []}
    for text_len, has_image in ((7, True), (12, False), (5, True)):
        text = torch.randint(5, 100, (text_len,), generator=g).tolist()
        ids = text[:2] + [image_id] * n_image + text[2:] if has_image else text
        labels = [-100] * (len(ids) - 4) + ids[-4:]
        crop = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8).numpy().tobytes()
        image = {"uint8": crop if has_image else b"", "scale": [2 / 255] * 3, "offset": [-1.0] * 3}  # shard layout
        for key, value in (("input_ids", ids), ("labels", labels), ("pixel_values", image),
                           ("num_images", int(has_image)), ("length", len(ids))):
            rows[key].append(value)
    return pa.table(rows), CropPixels((3, size, size), n_image)


def per_sample_losses(logits, labels, sizes):
    losses, at = [], 0
    for n in sizes:
        seg_logits, seg_labels = logits[0, at:at + n - 1], labels[0, at + 1:at + n]
        losses.append(F.cross_entropy(seg_logits, seg_labels, ignore_index=-100))
        at += n
    return torch.stack(losses)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_samples_match_running_alone(tiny_dataset, attention):
    torch.manual_seed(0)
    model, processor = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    model.set_attn_implementation(attention)
    model.eval()
    table, pixels = sample_table(model, processor)
    sizes = table.column("length").to_pylist()
    packed = collate_packed(table, [np.array([0, 1, 2])], pad_token_id=0, pixels=pixels)
    assert packed["pixel_values"].shape[0] == 2
    with torch.no_grad():
        out = model(**packed, use_cache=False)  # a cache (the default in eval) turns packed detection off
        alone_logits, alone_losses = [], []
        for k in range(3):
            single = collate_packed(table, [np.array([k])], pad_token_id=0, pixels=pixels)
            result = model(**single, use_cache=False)
            alone_logits.append(result.logits[0])
            alone_losses.append(result.loss)
    packed_losses = per_sample_losses(out.logits, packed["labels"], sizes)
    assert torch.allclose(packed_losses, torch.stack(alone_losses), atol=1e-5)
    assert torch.allclose(out.logits[0, : sum(sizes)], torch.cat(alone_logits), atol=1e-4)

    # Without the restarts (one long sequence) the later samples see the earlier ones: the check above can fail.
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], pixel_values=packed["pixel_values"],
                      attention_mask=torch.ones_like(packed["input_ids"]))
    assert not torch.allclose(per_sample_losses(leaky.logits, packed["labels"], sizes)[1:],
                              torch.stack(alone_losses)[1:], atol=1e-3)


def test_text_only_batch_runs_the_vision_path_without_changing_the_loss(tiny_dataset):
    """ZeRO ranks must run the same modules in the same order: a text-only micro-batch gets a blank image row."""
    from llava_core.train.batching import collate
    from llava_core.train.engine import with_blank_image_row

    torch.manual_seed(0)
    model, processor = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    table, pixels = sample_table(model, processor)
    for make in (lambda: collate(table, np.array([1]), 0, pixels),
                 lambda: collate_packed(table, [np.array([1])], 0, pixels)):
        batch = make()
        assert batch["pixel_values"] is None
        plain = model(**{k: v for k, v in batch.items() if v is not None}, use_cache=False).loss
        blank = with_blank_image_row(batch, model.config.image_token_index, pixels.blank(), pad_id=0)
        assert blank["pixel_values"].shape == (1, *pixels.image_shape)
        model.zero_grad()
        loss = model(**blank, use_cache=False).loss
        loss.backward()
        assert torch.allclose(loss, plain, atol=1e-6)
        projector = model.model.multi_modal_projector.linear_1.weight
        assert projector.grad is not None and torch.count_nonzero(projector.grad) == 0  # in the graph, weight 0


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flash attention's variable-length path on the CPU (its kernel needs a GPU), as transformers drives it when
    given `cu_seq_lens_*`: the batch's rows read as one sequence, attention within each segment the boundaries give
    (positions past the last are left zero); records who called it with which boundaries."""
    bounds, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    assert isinstance(longest, int)  # on the host: no sync to read it
    varlen_reference.calls.append((module, bounds))
    batch, heads, length, dim = query.shape
    q, k, v = (t.transpose(0, 1).reshape(1, t.shape[1], batch * length, dim) for t in (query, key, value))
    out = torch.zeros_like(q)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        b = min(b, batch * length)
        if a < b:
            out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                            is_causal=module.is_causal, scale=scaling, enable_gqa=True)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3), None


def test_flattened_packed_rows_carry_their_boundaries_to_every_llm_layer_and_never_to_the_tower(tiny_dataset):
    """Flash attention's packing path: the sequences' boundaries, found once per micro-batch, reach every decoder
    layer (the same tensor: nothing recomputed per layer), give each sample its own logits, and stay out of the
    tower, which the LLaVA classes hand the same keyword arguments."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    from llava_core.model.build import attention_by_part
    from llava_core.train.engine import model_inputs

    AttentionInterface.register("varlen_reference", varlen_reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register("varlen_reference", flash_attention_mask)
    torch.manual_seed(0)
    model, processor = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    model.eval()
    table, pixels = sample_table(model, processor)
    sizes = table.column("length").to_pylist()
    batch = collate_packed(table, [np.array([0, 1]), np.array([2])], pad_token_id=0, pixels=pixels)
    inputs = model_inputs(batch, model.config.image_token_index, pixels, 0, flatten=True)

    width = batch["input_ids"].shape[1]  # the second row: sample 2, then its padding tail as a segment of its own
    assert inputs["cu_seq_lens_q"].tolist() == [0, sizes[0], width, width + sizes[2], 2 * width]
    assert inputs["max_length_q"] == max(sizes[0], width - sizes[0], sizes[2], width - sizes[2])
    assert inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]

    # flash attention's kernel replaced by its CPU reference wherever the training model would run it
    parts = {part: "varlen_reference" if attention == "flash_attention_2" else attention
             for part, attention in attention_by_part("flash_attention_2").items()}

    def logits_with(tower_attention):
        varlen_reference.calls = []
        model.set_attn_implementation({**parts, "vision_config": tower_attention})
        with torch.no_grad():
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[0]
        return torch.cat([logits[:sizes[0] + sizes[1]], logits[width:width + sizes[2]]])

    packed = logits_with(parts["vision_config"])
    layers = model.model.language_model.layers
    assert [module for module, _ in varlen_reference.calls] == [layer.self_attn for layer in layers]
    assert all(bounds is inputs["cu_seq_lens_q"] for _, bounds in varlen_reference.calls)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        alone = torch.cat([model(**collate_packed(table, [np.array([k])], 0, pixels), use_cache=False).logits[0]
                           for k in range(3)])
    assert torch.allclose(packed, alone, atol=1e-4)
    # A tower on a varlen attention would take the LLM's boundaries for its own: the check above can fail.
    assert not torch.allclose(logits_with("varlen_reference"), alone, atol=1e-3)
