"""The stand-ins are shaped like their hub repos, and load through the same code path as the real ones."""
import glob
import json
import os

import pytest
import torch

from llava_core.model import standins

VICUNA_FILES = {"config.json", "generation_config.json", "pytorch_model.bin.index.json", "special_tokens_map.json",
                "tokenizer.model", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hub"))
    corpus = ["a red circle on the left", "What colour is the shape?", "blue"] * 10
    cfg = standins.TinyModelConfig(image_size=32, patch_size=8, vocab_size=400)
    for hub_id in ["openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-v1.5"]:
        standins.save_standin(hub_id, os.path.join(root, hub_id), corpus, cfg)
    return root


def test_clip_is_a_full_clip_repo_whose_vision_tower_loads(hub):
    from transformers import AutoImageProcessor, CLIPVisionModel

    from llava_core.model.build import image_seq_length, vision_config

    path = os.path.join(hub, "openai/clip-vit-large-patch14-336")
    assert set(os.listdir(path)) == {"config.json", "preprocessor_config.json", "pytorch_model.bin"}
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["architectures"] == ["CLIPModel"] and "image_size" not in config  # as the real CLIPConfig
    assert config["vision_config"]["image_size"] == 32 and "text_config" in config
    preprocessor = json.load(open(os.path.join(path, "preprocessor_config.json")))
    assert preprocessor["feature_extractor_type"] == "CLIPFeatureExtractor" and preprocessor["crop_size"] == 32
    assert image_seq_length(vision_config(path)) == 16
    processor = AutoImageProcessor.from_pretrained(path)  # the legacy integer sizes load as the processor's dicts
    assert processor.crop_size["height"] == 32 and processor.size["shortest_edge"] == 32
    # LLaVA loads only the vision half of the full CLIP checkpoint: its weights, not a fresh random init.
    saved = torch.load(os.path.join(path, "pytorch_model.bin"))
    tower = CLIPVisionModel.from_pretrained(path)
    key = "embeddings.position_embedding.weight"
    assert torch.equal(tower.state_dict()[key], saved["vision_model." + key])
    assert any(k.startswith("text_model.") for k in saved)


@pytest.mark.parametrize("hub_id, shards", [("lmsys/vicuna-7b-v1.5", 2), ("lmsys/vicuna-13b-v1.5", 3)])
def test_vicuna_is_sharded_bin_with_a_sentencepiece_tokenizer_only(hub, hub_id, shards):
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = os.path.join(hub, hub_id)
    shard_files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "pytorch_model-*.bin")))
    assert shard_files == [f"pytorch_model-{n:05d}-of-{shards:05d}.bin" for n in range(1, shards + 1)]
    assert set(os.listdir(path)) == VICUNA_FILES | set(shard_files)  # no tokenizer.json
    index = json.load(open(os.path.join(path, "pytorch_model.bin.index.json")))
    assert set(index["weight_map"].values()) == set(shard_files)
    model = LlamaForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float16  # the repos' config says float16
    saved = {}
    for name in shard_files:
        saved.update(torch.load(os.path.join(path, name)))
    assert set(saved) == set(index["weight_map"]) and all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ == "LlamaTokenizer" and tokenizer.pad_token is None
    ids = tokenizer("ASSISTANT: 4")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.convert_ids_to_tokens(ids)[-2:] == ["▁", "4"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("é")["input_ids"])[-2:] == ["<0xC3>", "<0xA9>"]  # byte fallback


def test_the_processor_carries_the_template_the_llm_trains_with(hub):
    from llava_core.model.build import assemble_llava
    from llava_core.model.chat_template import VICUNA_V1_CHAT_TEMPLATE

    vision, llm = (os.path.join(hub, h) for h in ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"))
    _, vicuna = assemble_llava(vision, llm)
    assert vicuna.chat_template == VICUNA_V1_CHAT_TEMPLATE
    config = json.load(open(os.path.join(llm, "tokenizer_config.json")))
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with open(os.path.join(llm, "tokenizer_config.json"), "w") as f:
        json.dump({**config, "chat_template": chatml}, f)
    try:
        _, own = assemble_llava(vision, llm, template="chat_template")
    finally:
        with open(os.path.join(llm, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    assert own.chat_template == chatml
