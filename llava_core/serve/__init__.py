"""The OpenAI-compatible endpoint on Ray Serve.

A request's path through the replica (`app`): `protocol` checks its body (`json_body` first), `media` decodes its
images and videos (`image_fetch` for allowed http(s) URLs), the engine (`llava_core.inference`) generates for it in a
batch, and `sse` streams the answer (`responses`: the bodies it answers with). On the driver: `client` deploys the
application of either engine and asks it (`readiness`: how long to wait, and what Serve says), `deploy_config` builds
the applications as Ray Serve configs: this package's app, or vLLM through Ray's `ray.serve.llm` for
`serve.engine: vllm`. The workflow's serve stage is `llava_core.demo`.
"""
