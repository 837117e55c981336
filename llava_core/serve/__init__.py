"""The OpenAI-compatible endpoint on Ray Serve.

A request's path through the replica (`app`): `protocol` checks its body, `media` decodes its images and videos
(`image_fetch` for allowed http(s) URLs), the `engine` generates for it in a batch (`token_sampler`: its own
temperature, top-p and seed; `answer_stream`: tokens to text), and `sse` streams the answer. On the driver: `client`
deploys the application of either engine and asks it (`readiness`: how long to wait, and what Serve says), `stage` is
the workflow's serve stage, `deploy_config` builds the applications as Ray Serve configs: this package's app, or
vLLM through Ray's `ray.serve.llm` for `serve.engine: vllm`.
"""
