"""The evaluate stage on a real (tiny, untrained) model: Ray Data actors and the live endpoint give the same answers.

The tiny model's answers are arbitrary but deterministic, so agreement between the two backends, question by
question and for the blind baseline too, shows that both send the same prompts and the same pixels. Scores are then
recomputed from the written predictions through the scoring entry point, and the report must show them.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_core.config import EvalEndpointSettings, EvalSetSettings, EvaluateSettings, ServeSettings
from llava_core.eval.backends import answer_questions
from llava_core.eval.evaluate import run_evaluate
from llava_core.eval.layouts import load_eval_set
from llava_core.eval.scoring import score_set
from tests.ports import free_port

MODEL = "tiny-llava-eval"
API_KEY = "eval-key"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory):
    """A few images (wide, tall, square; PNG and JPEG) and a few questions in each layout."""
    root = tmp_path_factory.mktemp("eval_sets")
    folder = root / "images"
    folder.mkdir()
    shapes = [(48, 24, "png"), (20, 56, "jpg"), (32, 32, "png"), (40, 30, "jpg")]
    for i, (w, h, ext) in enumerate(shapes):
        image = Image.new("RGB", (w, h), (30 + 50 * i, 200 - 40 * i, 90))
        image.paste(Image.new("RGB", (w // 3, h // 3), (250, 250 - 60 * i, 20)), (w // 4, h // 4))
        image.save(folder / f"img{i}.{ext}")
    name = [f"img{i}.{ext}" for i, (_, _, ext) in enumerate(shapes)]
    llava_q = [{"question_id": i, "image": name[i % 4], "text": f"What colour is the <shape> {i}?"} for i in range(5)]
    llava_a = [{"question_id": i, "answer": "red"} for i in range(5)]
    vqa = [{"question_id": f"v{i}", "image": name[(i + 1) % 4], "question": "How many shapes?",
            "answers": ["one"] * 6 + ["two"] * 4} for i in range(4)]
    pope = [{"question_id": i, "image": name[i % 4], "text": f"Is there a square {i}?",
             "label": "yes" if i % 2 else "no", "category": "random"} for i in range(4)]
    choice = [{"question_id": i, "image": name[(i + 2) % 4], "question": "Which colour?",
               "options": ["red", "green", "blue"], "answer": "ABC"[i]} for i in range(3)]
    return EvaluateSettings(
        questions=write_jsonl(root / "q.jsonl", llava_q), answers=write_jsonl(root / "a.jsonl", llava_a),
        image_folder=str(folder), max_new_tokens=4, batch_size=4, num_actors=2, report_examples=2,
        sets={
            "vqa": EvalSetSettings(layout="vqa", questions=write_jsonl(root / "vqa.jsonl", vqa),
                                   image_folder=str(folder)),
            "pope": EvalSetSettings(layout="pope", questions=write_jsonl(root / "pope.jsonl", pope),
                                    image_folder=str(folder)),
            "mc": EvalSetSettings(layout="choice", questions=write_jsonl(root / "mc.jsonl", choice),
                                  image_folder=str(folder), circular=True),
        })


@pytest.fixture(scope="module")
def in_process(ray_session, tiny_llava_dir, eval_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_in_process")
    return run_evaluate(tiny_llava_dir, eval_sets, str(out), title="tiny"), out


@pytest.fixture(scope="module")
def through_endpoint(in_process, tiny_llava_dir, eval_sets, tmp_path_factory):
    """After the in-process run, so the Serve replica does not take a CPU from the Ray Data actors."""
    from dataclasses import replace

    from llava_core.serve.client import deploy, shutdown

    key_file = tmp_path_factory.mktemp("secrets") / "api-key"  # as a Kubernetes secret is mounted
    key_file.write_text(API_KEY + "\n")
    url = deploy(tiny_llava_dir, ServeSettings(port=free_port(), api_key_file=str(key_file), max_batch_size=8), MODEL)
    try:
        settings = replace(eval_sets, endpoint=EvalEndpointSettings(url=url + "/v1", model=MODEL,
                                                                    api_key_file=str(key_file), concurrency=6))
        out = tmp_path_factory.mktemp("eval_endpoint")
        metrics = run_evaluate(tiny_llava_dir, settings, str(out), title="tiny")
    finally:
        shutdown()
    return metrics, out


def predictions(out, name):
    return [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]


def test_endpoint_and_in_process_give_the_same_answers(in_process, through_endpoint):
    (local, local_out), (remote, remote_out) = in_process, through_endpoint
    assert local["backend"] == "ray_data" and remote["backend"].startswith("endpoint")
    for name in ("main", "vqa", "pope", "mc"):
        mine, theirs = predictions(local_out, name), predictions(remote_out, name)
        assert [r["prediction"] for r in mine] == [r["prediction"] for r in theirs], name
        assert [r["blind_prediction"] for r in mine] == [r["blind_prediction"] for r in theirs], name
    assert local["sets"] == remote["sets"]
    answers = [r["prediction"] for name in ("main", "vqa", "pope", "mc") for r in predictions(local_out, name)]
    assert any(answers), "every answer is empty, so agreement would prove nothing"


def test_in_process_answers_are_the_models_greedy_answers(in_process, tiny_llava_dir, eval_sets):
    """One question answered alone through the actors' path (the serving engine), outside Ray, and by plain
    transformers greedy decoding: batching changes nothing and the engine adds nothing to the model's answer."""
    from llava_core.data.images import decode_image
    from llava_core.inference.engine import GenerationEngine
    from llava_core.model.build import load_llava

    _, out = in_process
    item = load_eval_set(eval_sets.sets["mc"])[1]
    picture = decode_image(open(item.image_path, "rb").read())
    alone = answer_questions(GenerationEngine(tiny_llava_dir), [item.text], [picture], [eval_sets.max_new_tokens], 1)
    assert torch.is_grad_enabled()  # inference mode stays inside the engine

    model, processor = load_llava(tiny_llava_dir)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": item.text}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        output = model.eval().generate(**inputs, max_new_tokens=eval_sets.max_new_tokens, do_sample=False,
                                       pad_token_id=processor.tokenizer.pad_token_id)
    reference = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert predictions(out, "mc")[1]["prediction"] == alone[0] == reference.strip()


def test_stage_metrics_follow_from_the_written_predictions(in_process, eval_sets):
    metrics, out = in_process
    assert metrics["primary"] == "main" and metrics["questions"] == 5
    for name, s in eval_sets.all_sets().items():
        items, rows = load_eval_set(s), predictions(out, name)
        assert [r["key"] for r in rows] == [i.key for i in items]
        score = score_set(s.layout, items, [r["prediction"] for r in rows])
        blind = score_set(s.layout, items, [r["blind_prediction"] for r in rows])
        assert metrics["sets"][name]["accuracy"] == round(score.metrics["accuracy"], 4)
        assert metrics["sets"][name]["blind"]["accuracy"] == round(blind.metrics["accuracy"], 4)
    assert metrics["accuracy"] == metrics["sets"]["main"]["accuracy"]
    assert metrics["blind_accuracy"] == metrics["sets"]["main"]["blind"]["accuracy"]
    assert metrics["sets"]["mc"]["count"] == 3 and metrics["sets"]["mc"]["asked"] == 9
    assert json.loads((out / "metrics.json").read_text()) == metrics

    html = (out / "report.html").read_text()
    for name in ("main", "vqa", "pope", "mc"):
        assert f"{metrics['sets'][name]['accuracy']:.4f}" in html
    assert f"{metrics['sets']['pope']['f1']:.4f}" in html
    assert "&lt;shape&gt;" in html and "<shape>" not in html
    assert html.count("data:image/png;base64,") == 4 * 2
