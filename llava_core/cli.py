"""`llava-ray`: run or validate a workflow, or serve an exported model."""
from __future__ import annotations

import argparse
import json
import os
import sys

from llava_core.config import WorkflowError, load_workflow
from llava_core.workflow import STAGES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a workflow: prepare, align, instruct, export, evaluate, serve")
    run.add_argument("workflow", help="workflow YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set instruct.lr=1e-5 (repeatable)")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--only", choices=STAGES, help="run just this stage (its inputs must exist)")
    group.add_argument("--from", dest="start", choices=STAGES, help="rerun this stage and every stage after it")
    run.add_argument("--exit-after-serve", action="store_true",
                     help="stop the endpoint and exit after the serve stage's demo request")

    validate = sub.add_parser("validate", help="check a workflow file without running anything")
    validate.add_argument("workflow")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    serve = sub.add_parser("serve", help="serve an exported model (HF LLaVA directory) on its own")
    serve.add_argument("model_dir")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", default="")
    serve.add_argument("--api-key", default=os.environ.get("LLAVA_RAY_API_KEY"))
    return parser


def _serve(args) -> int:
    import ray

    from llava_core.config import ServeSettings
    from llava_core.serve.app import deploy
    from llava_core.serve.demo import serve_until_interrupted

    name = args.model_name or os.path.basename(os.path.normpath(args.model_dir))
    settings = ServeSettings(host=args.host, port=args.port, model_name=name, api_key=args.api_key)
    ray.init(configure_logging=False)
    url = deploy(os.path.abspath(args.model_dir), settings, name)
    print(f"serving '{name}' at {url}/v1/chat/completions", flush=True)
    serve_until_interrupted()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    try:
        if args.command == "serve":
            return _serve(args)
        workflow = load_workflow(args.workflow, args.overrides)
    except WorkflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.workflow}: valid; run directory {workflow.run_dir}")
        return 0
    from llava_core.workflow import run_workflow

    summary = run_workflow(workflow, only=args.only, start=args.start, exit_after_serve=args.exit_after_serve)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
