"""A model loaded and saved again (the preference stage's output: it starts from the instruct model's directory) is
an export transformers 4 reads as it read the first: transformers 5 loads a LLaVA repo's tokenizer as its generic
`TokenizersBackend` and would name that class in the saved tokenizer_config.json, which 4.x cannot load."""
import json
import os

import torch

from tests.other_readers import HF4_PYTHON, TRANSFORMERS_READER, run_reader, write_questions


def test_a_loaded_and_saved_again_model_keeps_its_tokenizer_class_and_its_answers(tiny_dataset, tiny_llava_dir,
                                                                                  tmp_path):
    from llava_core.model.build import load_llava
    from llava_core.train.save import save_hf_model

    model, processor = load_llava(tiny_llava_dir)
    assert type(processor.tokenizer).__name__ == "TokenizersBackend"  # what transformers 5 makes of it
    again = str(tmp_path / "again")
    save_hf_model(model, processor, again, torch.float32)

    def tokenizer_class(directory):
        return json.load(open(os.path.join(directory, "tokenizer_config.json")))["tokenizer_class"]

    assert tokenizer_class(again) == tokenizer_class(tiny_llava_dir) == "LlamaTokenizer"
    image = os.path.join(tiny_dataset["image_folder"], json.load(open(tiny_dataset["instruct"]))[0]["image"])
    questions = write_questions(str(tmp_path / "q.json"), ["What colour is the shape?"], [image])
    first, second = (run_reader(HF4_PYTHON, TRANSFORMERS_READER, "answers", export, questions, "6")
                     for export in (tiny_llava_dir, again))
    assert first["transformers"].startswith("4.") and second["result"] == first["result"]
