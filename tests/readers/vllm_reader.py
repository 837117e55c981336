"""Run by the vLLM environment's Python (`.venv-vllm`: vLLM's CPU build; tests/end_to_end/test_export_readers.py) on one
export. Imports nothing of llava-ray: vLLM reads the export's own files (weights, config, processor, chat template).
Prints one JSON line.

    python vllm_reader.py EXPORT QUESTIONS_JSON MAX_TOKENS
        greedy answers to [{"text", "image"}, ...] (image: a file), asked through vLLM's chat (the export's chat
        template and processor), all at once as a server batches them: vLLM's text, and its tokens decoded whole by
        the export's tokenizer (vLLM's incremental detokenizer writes an unfinished UTF-8 byte sequence otherwise,
        which only an untrained model's answers are full of).
"""
import json
import os
import sys

# A CPU engine in this process, small: 1 GiB of KV cache, threads unbound (the machine is shared).
for name, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                    ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
    os.environ.setdefault(name, value)

from PIL import Image  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402


def main(export: str, questions_file: str, max_tokens: str) -> dict:
    questions = json.load(open(questions_file))
    llm = LLM(model=export, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 1})
    chats = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.open(q["image"]).convert("RGB")},
                                           {"type": "text", "text": q["text"]}]}] for q in questions]
    outputs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=int(max_tokens)), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    return {"answers": [o.outputs[0].text.strip() for o in outputs],
            "decoded": [tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True).strip() for o in outputs],
            "prompt_tokens": [len(o.prompt_token_ids) for o in outputs]}


if __name__ == "__main__":
    import vllm

    result = main(*sys.argv[1:])
    print(json.dumps({"vllm": vllm.__version__, "imported_llava_core": "llava_core" in sys.modules, **result}))
