"""Run by another environment's Python (transformers 4.x: tests/end_to_end/test_export_readers.py) on exports. Imports
nothing of llava-ray: the reader has only the export's files. Prints one JSON line.

    python transformers_reader.py weights EXPORT [EXPORT ...]
        per export: its family, the keys missing, unexpected or mismatched at load, and a fingerprint of every
        weight the loaded model holds;
    python transformers_reader.py answers EXPORT QUESTIONS_JSON MAX_NEW_TOKENS
        greedy answers to [{"text", "image"}, ...] (image: a file), with the export's own processor.
"""
import json
import sys

import torch
import transformers
from PIL import Image

CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def load(export: str):
    family = json.load(open(f"{export}/config.json"))["model_type"]
    model, info = getattr(transformers, CLASSES[family]).from_pretrained(export, output_loading_info=True)
    return family, model.eval(), info


def fingerprint(tensor) -> list:
    """Shape, sum and norm in float64: a random tensor where the file's should be gives another fingerprint."""
    values = tensor.detach().double()
    return [list(tensor.shape), round(values.sum().item(), 6), round(values.norm().item(), 6)]


def weights(export: str) -> dict:
    family, model, info = load(export)
    return {"family": family, **{key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys",
                                                                     "mismatched_keys")},
            "weights": sorted(fingerprint(p) for _, p in model.named_parameters())}


def answers(export: str, questions_file: str, max_new_tokens: str) -> list[str]:
    _, model, _ = load(export)
    processor = transformers.AutoProcessor.from_pretrained(export)
    out = []
    for question in json.load(open(questions_file)):
        image = Image.open(question["image"]).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question["text"]}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False)
        out.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                              skip_special_tokens=True).strip())
    return out


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    result = [weights(export) for export in args] if mode == "weights" else answers(*args)
    print(json.dumps({"transformers": transformers.__version__, "imported_llava_core": "llava_core" in sys.modules,
                      "result": result}))
