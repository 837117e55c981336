"""`serve.engine: vllm`: serve the export with vLLM through Ray's own OpenAI app (`ray.serve.llm`), on GPU nodes.

The export is a standard Hugging Face LLaVA checkpoint with its chat template, which vLLM loads as it is. vLLM is an
optional dependency (`pip install "ray[llm]"` on a GPU image); without it this module says so instead of failing on
an import deep inside Ray. `llava-ray serve --config-out` writes the same application as a config file without
importing anything of vLLM (`deploy_config.vllm_llm_config`).
"""
from __future__ import annotations

from llava_core.config import ServeSettings, WorkflowError
from llava_core.serve.deploy_config import APP_NAME, export_family, vllm_llm_config


def run_vllm(model_dir: str, settings: ServeSettings, model_name: str) -> str:
    """Serve on the already-initialised Ray; returns the base URL (`/v1/chat/completions`, `/v1/models`)."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as error:
        raise WorkflowError(f"serve.engine: vllm needs vLLM on the cluster ({error}); install it with "
                            "`pip install \"ray[llm]\"` on GPU nodes, or use serve.engine: transformers") from None
    from ray import serve

    from llava_core.serve.client import client_host

    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_openai_app({"llm_configs": [vllm_llm_config(model_dir, settings, model_name,
                                                            export_family(model_dir))]})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{client_host(settings.host)}:{settings.port}"
