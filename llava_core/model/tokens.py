"""The special tokens LLaVA adds to an LLM's tokenizer: their only definition.

A LLaVA-format conversation marks where an image or a video goes with the same text (`<image>`, `<video>`) that the
processor expands into feature positions, so the data's tags (`data/formats.py`), the tokenizer's added tokens and the
served chat template's media parts are one fact. `<pad>` is added only where the LLM has no pad token (Vicuna).
"""

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
PAD_TOKEN = "<pad>"
