"""The LLaVA-OneVision quickstart end to end, as `make run QUICKSTART=workflows/quickstart-onevision.yaml` runs it:
stand-ins of SigLIP so400m and Qwen2-7B-Instruct, "Higher AnyRes" (anyres_max_4), every stage, then its ablation
at `image_aspect_ratio: pad` (the image at the tower's base size only) on the same data, budget and seed.

Checks values: the model learned to look (accuracy and its lead over the image-blind baseline), AnyRes earns its
keep on the questions only tiles can answer (the small dot's colour) and loses nothing on the rest, the export is
transformers' own LlavaOnevisionForConditionalGeneration and answers as the endpoint did, and the rows the
processor tiled are the ones the model trained on (exact token counts in the shards)."""
import json
import os

import pytest

from llava_core.config import load_workflow
from llava_core.workflow import run_workflow
from tests.ports import free_port

WORKFLOW = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "workflows",
                                        "quickstart-onevision.yaml"))
HIGHRES = "highres"


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    path = tmp_path_factory.mktemp("quickstart_onevision")
    old = os.getcwd()
    os.chdir(path)  # the workflow's relative paths (data/, runs/) land here
    try:
        workflow = load_workflow(WORKFLOW, [f"serve.port={free_port()}"])
        yield workflow, run_workflow(workflow, exit_after_serve=True)
    finally:
        os.chdir(old)


def predictions(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "evaluate", "main", "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def instruct_rows(run_dir: str) -> dict[str, dict]:
    import pyarrow.parquet as pq

    manifest = json.load(open(os.path.join(run_dir, "prepare", "manifest.json")))
    table = pq.read_table(manifest["datasets"]["instruct"]["shards"], columns=["id", "image_tokens", "length"])
    return {row.pop("id"): row for row in table.to_pylist()}


def accuracy(rows: list[dict]) -> float:
    return sum(r["correct"] for r in rows) / len(rows)


def test_every_stage_ran_and_the_model_learned_to_look(first_run):
    workflow, summary = first_run
    assert [summary[s]["status"] for s in ("prepare", "align", "instruct", "export", "evaluate", "serve")] == \
        ["done"] * 6
    evaluation = summary["evaluate"]
    assert evaluation["accuracy"] >= 0.80, evaluation
    assert evaluation["accuracy"] - evaluation["blind_accuracy"] >= 0.40, evaluation


def test_anyres_beats_the_base_size_on_what_only_tiles_show(first_run):
    workflow, summary = first_run
    pad = summary["ablations"]["pad"]
    assert pad["settings"] == {"prepare.image_aspect_ratio": "pad"}
    assert pad["by_category_gain"][HIGHRES] >= 0.30, pad
    own, base = predictions(workflow.run_dir), predictions(pad["run_dir"])
    assert [r["question_id"] for r in own] == [r["question_id"] for r in base]  # the same questions
    # The ablation trained on the same rows and text, each single image in its own, smaller layout (26-36 tokens:
    # the base view and one tile at the base size, against AnyRes's 76-88); several images are base views in both.
    own_rows, pad_rows = instruct_rows(workflow.run_dir), instruct_rows(pad["run_dir"])
    assert own_rows.keys() == pad_rows.keys() and len(own_rows) > 4000
    for row_id, row in own_rows.items():
        ablated = pad_rows[row_id]
        assert row["length"] - sum(row["image_tokens"]) == ablated["length"] - sum(ablated["image_tokens"])
        if len(row["image_tokens"]) == 1:
            assert ablated["image_tokens"][0] < row["image_tokens"][0], (row_id, row, ablated)
        else:
            assert ablated["image_tokens"] == row["image_tokens"], (row_id, row, ablated)


def test_anyres_loses_nothing_on_what_the_base_view_shows(first_run):
    workflow, summary = first_run
    own, base = predictions(workflow.run_dir), predictions(summary["ablations"]["pad"]["run_dir"])
    rest = [r for r in own if r["category"] != HIGHRES]
    rest_base = [r for r in base if r["category"] != HIGHRES]
    assert len(rest) >= 300 and accuracy(rest) >= accuracy(rest_base) - 0.02, (accuracy(rest), accuracy(rest_base))


def test_the_export_is_transformers_onevision_and_answers_as_the_endpoint_did(first_run):
    import torch
    from PIL import Image
    from transformers import LlavaOnevisionForConditionalGeneration

    from llava_core.model.processors import ImageOnlyOnevisionProcessor  # transformers' own, minus torchvision's video

    workflow, summary = first_run
    export = os.path.join(workflow.run_dir, "export")
    config = json.load(open(os.path.join(export, "config.json")))
    processor_config = json.load(open(os.path.join(export, "processor_config.json")))
    assert config["model_type"] == "llava_onevision"
    assert config["vision_aspect_ratio"] == workflow.prepare.image_aspect_ratio
    assert processor_config["processor_class"] == "LlavaOnevisionProcessor" and "video_processor" in processor_config
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(export).eval()
    processor = ImageOnlyOnevisionProcessor.from_pretrained(export)
    demo = json.load(open(os.path.join(workflow.run_dir, "serve", "demo.json")))
    question = json.loads(open(workflow.evaluate.questions).readline())
    image = Image.open(os.path.join(workflow.evaluate.image_folder, question["image"])).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "text", "text": question["text"]}, {"type": "image"}]}]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=demo["max_tokens"], do_sample=False)
    answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == demo["answer"] == summary["serve"]["answer"] != ""


def test_the_shards_hold_each_images_exact_token_count(first_run):
    import pyarrow.parquet as pq

    workflow, _ = first_run
    manifest = json.load(open(os.path.join(workflow.run_dir, "prepare", "manifest.json")))
    table = pq.read_table(manifest["datasets"]["instruct"]["shards"][0],
                          columns=["input_ids", "image_tokens", "image_sizes", "num_images", "length"])
    image_token = json.load(open(os.path.join(workflow.run_dir, "export", "config.json")))["image_token_index"]
    rows = table.to_pylist()
    several = [r for r in rows if r["num_images"] > 1]
    assert several and all(len(set(r["image_tokens"])) == 1 for r in several)  # base views: one count for all
    for row in rows:
        assert row["length"] == len(row["input_ids"])
        assert row["input_ids"].count(image_token) == sum(row["image_tokens"])
        assert len(row["image_sizes"]) == row["num_images"]
