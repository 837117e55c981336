"""The vicuna_v1 conversation format as a Jinja chat template: its only definition.

Training renders vicuna_v1 rows through this template (`llava_core.data.templates.render_vicuna_v1`) and the export
ships it, so `processor.apply_chat_template(messages, add_generation_prompt=True)` renders exactly the text the model
was trained on, its BOS (`<s>`) included: engines that tokenize a rendered chat without adding special tokens
(vLLM's chat completions, SGLang, transformers' own `apply_chat_template(..., tokenize=True)`) then feed the model
the sequence it trained on. A caller that tokenizes the rendered text itself must not add another BOS. Each answer
and its end-of-turn token sit in `{% generation %}` markers, so `apply_chat_template(..., tokenize=True,
return_dict=True, return_assistant_tokens_mask=True)` marks the tokens training learns; a test pins that mask to
training's labels.
"""

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Content may be a string or a list of parts ({"type": "image"} / {"type": "text", "text": ...}); images are put at
# the front of their turn as "<image>\n", the normalisation LLaVA trains with.
# The generation prompt ends at `ASSISTANT:` and the space after it opens the answer's generation block: the first
# token the model generates is `▁red` (or a lone `▁` before a digit), so that space must be learned with the answer.
VICUNA_V1_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='" + VICUNA_SYSTEM.replace("'", "\\'") + "') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}{% endfor %}"
    "{% if bos_token %}{{ bos_token }}{% endif %}{{ ns.system }} "
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% set n_images = 0 %}"
    "{% else %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set n_images = message['content'] | selectattr('type', 'in', ['image', 'image_url']) | list | length %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}USER: {{ '<image>\n' * n_images }}{{ text }} "
    "{% else %}ASSISTANT:{% generation %} {{ text }}{{ eos_token }}{% endgeneration %}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen/Qwen2-7B-Instruct's own template (its tokenizer_config.json `chat_template`): ChatML with a default system
# prompt. Read from copies of the repo's tokenizer_config.json in public code (e.g. a DistillKit config that pins
# Qwen's template); the same system line is LLaVA-NeXT's `conv_qwen` ("qwen_1_5", llava/conversation.py), the
# template LLaVA-OneVision trains with. Content must be a string here: text-only LLMs know no image parts.
QWEN2_SYSTEM = "You are a helpful assistant."
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + QWEN2_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# LLaVA-OneVision's ChatML: in each turn its images come first ("<image>\n" each), then its videos ("<video>\n"),
# then its text, as transformers' convert_llava_onevision_weights_to_hf.py template renders them. Unlike that
# template, a conversation without a system turn gets Qwen2's default system prompt, because that is what
# LLaVA-OneVision was trained with (`conv_qwen`); for text-only messages this renders exactly what the Qwen2 LLM's
# own template renders. Content may be a string or a list of parts.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + QWEN2_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'in', ['image', 'image_url']) %}{{ '<image>\\n' }}"
    "{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
