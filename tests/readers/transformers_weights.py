"""Run by another environment's Python (transformers 4.x, tests/test_export_readers.py): load each export given on the
command line as its family's class and say, as one JSON line, which keys were missing or unexpected and a
fingerprint of every weight the model holds. Imports nothing of llava-ray: the reader has only the export's files."""
import json
import sys

import transformers

CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def fingerprint(tensor) -> list:
    """Shape, sum and norm in float64: a random tensor where the file's should be gives another fingerprint."""
    values = tensor.detach().double()
    return [list(tensor.shape), round(values.sum().item(), 6), round(values.norm().item(), 6)]


def read(export: str) -> dict:
    family = json.load(open(f"{export}/config.json"))["model_type"]
    model, info = getattr(transformers, CLASSES[family]).from_pretrained(export, output_loading_info=True)
    return {"family": family, "transformers": transformers.__version__,
            **{key: sorted(info[key]) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")},
            "weights": sorted(fingerprint(p) for _, p in model.named_parameters()),
            "imported_llava_core": "llava_core" in sys.modules}


if __name__ == "__main__":
    print(json.dumps([read(export) for export in sys.argv[1:]]))
