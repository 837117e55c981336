"""The stand-ins are shaped like their hub repos, and load through the same code path as the real ones."""
import glob
import json
import os

import pytest
import torch

from llava_core.quickstart import standins

# The real repos' files and config keys (sources cited in llava_core/quickstart/standins.py).
SIGLIP_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
                "spiece.model", "tokenizer_config.json"}
SIGLIP_CONFIG_KEYS = {"architectures", "initializer_factor", "model_type", "text_config", "torch_dtype",
                      "transformers_version", "vision_config"}
SIGLIP_TEXT_CONFIG_KEYS = {"hidden_size", "intermediate_size", "model_type", "num_attention_heads",
                           "num_hidden_layers"}
SIGLIP_VISION_CONFIG_KEYS = {"hidden_size", "image_size", "intermediate_size", "model_type", "num_attention_heads",
                             "num_hidden_layers", "patch_size"}
SIGLIP_PREPROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                       "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
                       "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098}
QWEN2_FILES = {"config.json", "generation_config.json", "merges.txt", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "vocab.json"} | \
              {f"model-0000{n}-of-00004.safetensors" for n in range(1, 5)}
QWEN2_CONFIG_KEYS = {"architectures", "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act",
                     "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
                     "max_window_layers", "model_type", "num_attention_heads", "num_hidden_layers",
                     "num_key_value_heads", "rms_norm_eps", "rope_theta", "sliding_window", "tie_word_embeddings",
                     "torch_dtype", "transformers_version", "use_cache", "use_sliding_window", "vocab_size"}
VICUNA_FILES = {"config.json", "generation_config.json", "pytorch_model.bin.index.json", "special_tokens_map.json",
                "tokenizer.model", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hub"))
    corpus = ["a red circle on the left", "What colour is the shape?", "blue"] * 10
    cfg = standins.TinyModelConfig(image_size=32, patch_size=8, vocab_size=400)
    for hub_id in ["openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-v1.5",
                   "google/siglip-so400m-patch14-384", "Qwen/Qwen2-7B-Instruct"]:
        standins.save_standin(hub_id, os.path.join(root, hub_id), corpus, cfg)
    return root


def test_clip_is_a_full_clip_repo_whose_vision_tower_loads(hub):
    from transformers import AutoImageProcessor, CLIPVisionModel

    from llava_core.model.families import features_per_view, vision_config

    path = os.path.join(hub, "openai/clip-vit-large-patch14-336")
    assert set(os.listdir(path)) == {"config.json", "preprocessor_config.json", "pytorch_model.bin"}
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["architectures"] == ["CLIPModel"] and "image_size" not in config  # as the real CLIPConfig
    assert config["vision_config"]["image_size"] == 32 and "text_config" in config
    preprocessor = json.load(open(os.path.join(path, "preprocessor_config.json")))
    assert preprocessor["feature_extractor_type"] == "CLIPFeatureExtractor" and preprocessor["crop_size"] == 32
    assert features_per_view(vision_config(path)) == 16
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
    assert set(saved) == set(index["weight_map"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ == "LlamaTokenizer" and tokenizer.pad_token is None
    ids = tokenizer("ASSISTANT: 4")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.convert_ids_to_tokens(ids)[-2:] == ["▁", "4"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("é")["input_ids"])[-2:] == ["<0xC3>", "<0xA9>"]  # byte fallback


def test_the_processor_carries_the_template_the_llm_trains_with(hub):
    from llava_core.model.build import assemble
    from llava_core.model.chat_template import VICUNA_V1_CHAT_TEMPLATE

    vision, llm = (os.path.join(hub, h) for h in ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5"))
    _, vicuna = assemble("llava", vision, llm)
    assert vicuna.chat_template == VICUNA_V1_CHAT_TEMPLATE
    config = json.load(open(os.path.join(llm, "tokenizer_config.json")))
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with open(os.path.join(llm, "tokenizer_config.json"), "w") as f:
        json.dump({**config, "chat_template": chatml}, f)
    try:
        _, own = assemble("llava", vision, llm, template="chat_template")
    finally:
        with open(os.path.join(llm, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    assert own.chat_template == chatml


def test_siglip_is_a_full_siglip_repo_whose_vision_tower_loads_as_onevision_cuts_it(hub):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, SiglipVisionModel

    path = os.path.join(hub, "google/siglip-so400m-patch14-384")
    assert set(os.listdir(path)) == SIGLIP_FILES
    config = json.load(open(os.path.join(path, "config.json")))
    assert set(config) == SIGLIP_CONFIG_KEYS and set(config["vision_config"]) == SIGLIP_VISION_CONFIG_KEYS
    assert set(config["text_config"]) == SIGLIP_TEXT_CONFIG_KEYS | {"vocab_size"}  # tiny vocabulary: named
    assert config["architectures"] == ["SiglipModel"] and config["vision_config"]["image_size"] == 32
    preprocessor = json.load(open(os.path.join(path, "preprocessor_config.json")))
    assert preprocessor == {**SIGLIP_PREPROCESSOR, "size": {"height": 32, "width": 32}}

    assert type(AutoConfig.from_pretrained(path)).__name__ == "SiglipConfig"
    full = AutoModel.from_pretrained(path)
    assert type(full).__name__ == "SiglipModel" and full.vision_model.head is not None  # pooling head shipped
    assert type(AutoImageProcessor.from_pretrained(path)).__name__.startswith("SiglipImageProcessor")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ == "SiglipTokenizer" and tokenizer("a red circle")["input_ids"][-1] == 1  # </s>

    saved = load_file(os.path.join(path, "model.safetensors"))
    assert any(k.startswith("text_model.") for k in saved) and "logit_bias" in saved
    # As transformers' LLaVA-OneVision conversion loads it: the vision half, last layer and head cut off.
    layers = config["vision_config"]["num_hidden_layers"]
    tower = SiglipVisionModel.from_pretrained(path, num_hidden_layers=layers - 1, vision_use_head=False)
    assert len(tower.encoder.layers) == layers - 1 and not hasattr(tower, "head")
    for key in ("embeddings.position_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(tower.state_dict()[key], saved["vision_model." + key])


def test_qwen2_is_sharded_safetensors_with_its_byte_level_bpe_tokenizer_and_chat_template(hub):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llava_core.model.chat_template import QWEN2_CHAT_TEMPLATE

    path = os.path.join(hub, "Qwen/Qwen2-7B-Instruct")
    assert set(os.listdir(path)) == QWEN2_FILES  # no special_tokens_map.json, as the repo
    config = json.load(open(os.path.join(path, "config.json")))
    assert set(config) == QWEN2_CONFIG_KEYS
    assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] < config["num_attention_heads"]
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == {f for f in QWEN2_FILES if f.startswith("model-")}

    assert type(AutoConfig.from_pretrained(path)).__name__ == "Qwen2Config"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16
    saved = {}
    for name in set(index["weight_map"].values()):
        saved.update(load_file(os.path.join(path, name)))
    assert set(saved) == set(index["weight_map"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert "model.layers.0.self_attn.q_proj.bias" in saved  # Qwen2's biased q/k/v

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.chat_template == QWEN2_CHAT_TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    first = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert first == len(json.load(open(os.path.join(path, "vocab.json"))))  # specials follow the learned vocabulary
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [first + 1, first + 2]
    assert config["vocab_size"] > len(tokenizer)  # spare embedding rows, as Qwen2-7B's 152064 for 151646 tokens
    messages = [{"role": "user", "content": "What colour is the shape?"}, {"role": "assistant", "content": "blue"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat colour is the shape?"
        "<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>\n")
    ids = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
    assert ids[0] == first + 1 and tokenizer.decode(ids).endswith("<|im_start|>assistant\n")  # no BOS in front
    # The roles are one token each after <|im_start|>, as in Qwen2's vocabulary (they are in every row).
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[-3:] == ["<|im_start|>", "assistant", "Ċ"] and tokens[11:14] == ["<|im_start|>", "user", "Ċ"]
    for text in ["a red circle on the left", "  two  spaces\n\nand lines", "Größe: 42 µm — 東京", "<|im_end|>x"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("is 42")["input_ids"])[-3:] == ["Ġ", "4", "2"]  # digits split
    assert tokenizer.convert_ids_to_tokens(tokenizer("é")["input_ids"]) == ["Ã", "©"]  # bytes, never <unk>


@pytest.mark.parametrize("width, vicuna, qwen2", [(0, 256, 640), (96, 96, 96)])
def test_the_llms_mlp_width_is_the_hub_models_ratio_unless_the_workflow_sets_one(width, vicuna, qwen2):
    cfg = standins.TinyModelConfig(llm_hidden=128, llm_intermediate=width)
    assert standins.llama_config(cfg, 400).intermediate_size == vicuna  # Vicuna-7B: 11008 / 4096
    assert standins.qwen2_config_json(cfg, 400, 400)["intermediate_size"] == qwen2  # Qwen2-7B: 18944 / 3584
