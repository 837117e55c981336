"""The evaluate stage: held-out questions answered greedily by the exported model, scored by exact match.

Beside the real score it reports the image-blind baseline: the same model and questions with a blank (mean-colour)
image. A model that learned to look scores far above it; one that learned only answer priors does not.
"""
from __future__ import annotations

import json
import re
import string
from collections import defaultdict

import torch

from llava_core import storage
from llava_core.data import images
from llava_core.model.build import load_llava


def normalise_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (the VQA convention)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def prompt_for(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def generate_answers(model, processor, questions: list[str], pil_images: list, max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding; images are padded to square as in training."""
    processor.tokenizer.padding_side = "left"
    fill = images.mean_colour(processor.image_processor)
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        prompts = [prompt_for(processor, q) for q in questions[chunk]]
        padded = [images.pad_to_square(im, fill) for im in pil_images[chunk]]
        inputs = processor(images=padded, text=prompts, padding=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers += [t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def score(predictions: list[str], references: list[str], categories: list[str]) -> dict:
    hits = [normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)]
    by_category = defaultdict(list)
    for category, hit in zip(categories, hits):
        by_category[category].append(hit)
    return {
        "accuracy": sum(hits) / max(len(hits), 1),
        "by_category": {c: round(sum(h) / len(h), 4) for c, h in sorted(by_category.items())},
        "count": len(hits),
    }


def run_evaluate(export_dir: str, settings, out_dir: str, cache_root: str) -> dict:
    model, processor = load_llava(storage.local_copy(export_dir, cache_root))
    model.eval()
    questions = read_jsonl(settings.questions)
    answers = {a["question_id"]: a["answer"] for a in read_jsonl(settings.answers)}
    texts = [q["text"] for q in questions]
    refs = [answers[q["question_id"]] for q in questions]
    categories = [q.get("category", "all") for q in questions]
    pictures = [images.decode_image(images.read_image_bytes(settings.image_folder, q["image"])) for q in questions]
    blank = [images.blank_image(processor.image_processor, size=max(p.size)) for p in pictures]

    seen = generate_answers(model, processor, texts, pictures, settings.max_new_tokens, settings.batch_size)
    blind = generate_answers(model, processor, texts, blank, settings.max_new_tokens, settings.batch_size)
    real, baseline = score(seen, refs, categories), score(blind, refs, categories)

    rows = [{"question_id": q["question_id"], "question": t, "answer": r, "prediction": s, "blind_prediction": b,
             "correct": normalise_answer(s) == normalise_answer(r)}
            for q, t, r, s, b in zip(questions, texts, refs, seen, blind)]
    storage.write_text(storage.join(out_dir, "predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"accuracy": round(real["accuracy"], 4), "blind_accuracy": round(baseline["accuracy"], 4),
               "by_category": real["by_category"], "blind_by_category": baseline["by_category"],
               "questions": real["count"]}
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    return metrics
