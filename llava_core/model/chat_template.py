"""The vicuna_v1 conversation format as a Jinja chat template.

The export ships this template so that `processor.apply_chat_template(messages, add_generation_prompt=True)` renders
exactly the text the model was trained on (see `llava_core.data.templates.render_vicuna_v1`); a test pins the two
against each other.
"""

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Content may be a string or a list of parts ({"type": "image"} / {"type": "text", "text": ...}); images are put at
# the front of their turn as "<image>\n", the normalisation LLaVA trains with.
VICUNA_V1_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='" + VICUNA_SYSTEM.replace("'", "\\'") + "') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}{% endfor %}"
    "{{ ns.system }} "
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% set n_images = 0 %}"
    "{% else %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% set n_images = message['content'] | selectattr('type', 'in', ['image', 'image_url']) | list | length %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}USER: {{ '<image>\n' * n_images }}{{ text }} "
    "{% else %}ASSISTANT: {{ text }}{{ eos_token }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
