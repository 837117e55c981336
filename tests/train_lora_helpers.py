"""The LoRA settings and a tiny batch to train them on, shared by tests/unit/test_train_lora.py and
tests/integration/test_train_lora.py."""
import torch

from llava_core.config import LoraSettings

LORA = LoraSettings(r=4, alpha=8, dropout=0.0,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def tiny_batch(model, processor, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = model.config
    n_image = config.image_seq_length
    text = torch.randint(5, 100, (2, 12), generator=g)
    image = torch.full((2, n_image), config.image_token_index)
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    size = processor.image_processor.crop_size["height"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(2, 3, size, size, generator=g)}


def assert_same_weights(module, expected):
    state, wanted = module.state_dict(), expected.state_dict()
    assert state.keys() == wanted.keys() and all(torch.equal(state[k], wanted[k]) for k in state)
