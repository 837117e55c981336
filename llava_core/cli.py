"""`llava-ray`: run, validate or submit a workflow, follow a submitted job, serve an exported model, or print the
workflow schema."""
from __future__ import annotations

import argparse
import json
import os
import sys

from llava_core.config import WorkflowError, load_workflow
from llava_core.flops import GPUS
from llava_core.logs import VERBOSE_ENV, configure_logging, init_ray
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
    _add_verbose(run)

    validate = sub.add_parser("validate", help="check a workflow file without running anything")
    validate.add_argument("workflow")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--plan", action="store_true",
                          help="also print the stages, their resources and steps, GPU-hours and memory per GPU")
    validate.add_argument("--gpu", default="a100-80gb", choices=GPUS, help="GPU type the plan assumes")
    validate.add_argument("--mfu", type=float, default=0.3, help="model-FLOPs utilisation the plan assumes")
    validate.add_argument("--check-remote", action="store_true", help="also check that s3:// paths exist")
    validate.add_argument("--json", action="store_true", help="print the plan as JSON")

    schema = sub.add_parser("schema", help="print the workflow's JSON Schema (or the docs' reference tables)",
                            description="Print the JSON Schema of a workflow file, which editors use to complete and "
                                        "check keys (the shipped workflows name workflows/schema.json in their first "
                                        "line), or with --markdown the reference tables of docs/reference/.")
    schema.add_argument("--markdown", action="store_true", help="print the reference tables instead")

    _add_job_commands(sub)

    serve = sub.add_parser("serve", help="serve an exported model on its own, or write a Ray Serve config for it",
                           description="Serve an export (a run directory means its export/ folder) at an "
                                       "OpenAI-compatible endpoint, or with --config-out write a Ray Serve config "
                                       "for `serve deploy` or a KubeRay RayService.")
    serve.add_argument("model_dir", help="export directory, or a run directory containing export/ (local or s3://)")
    serve.add_argument("--workflow", help="take the `serve:` settings of this workflow file")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a serve setting, e.g. --set num_replicas=2 --set engine=vllm (repeatable)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--model-name", help="the model id clients send (default: the run's name)")
    # The key itself is never an argument: arguments show in `ps` and in shell history.
    serve.add_argument("--api-key-env", metavar="VAR",
                       help="require `Authorization: Bearer <key>`, the key read from this environment variable")
    serve.add_argument("--api-key-file", metavar="FILE",
                       help="require `Authorization: Bearer <key>`, the key read from this file")
    serve.add_argument("--api-key", action=_KeyRefused, help=argparse.SUPPRESS)
    serve.add_argument("--config-out", metavar="FILE",
                       help="write a Ray Serve config YAML for this export and exit, without serving")
    _add_verbose(serve)
    return parser


class _KeyRefused(argparse.Action):
    """`--api-key KEY` says where the key belongs instead of argparse's "ambiguous option" (a prefix of two)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--api-key: the key is never an argument (arguments show in `ps` and shell history); put it in "
                     "an environment variable or a file and name that: --api-key-env VAR or --api-key-file FILE")


def _add_verbose(command) -> None:
    command.add_argument("--verbose", action="store_true",
                         help="show every library warning and Ray Data's own progress (filtered by default)")


def _add_job_commands(sub) -> None:
    address_help = "the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS, else the local head)"
    submit = sub.add_parser("submit", help="submit a workflow to a Ray cluster as one Ray Job")
    submit.add_argument("workflow")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--only", choices=STAGES)
    submit.add_argument("--from", dest="start", choices=STAGES)
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable), e.g. AWS_ENDPOINT_URL=...")
    submit.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job (repeatable)")
    submit.add_argument("--job-id", help="submission id (default: generated)")
    submit.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    _add_verbose(submit)

    status = sub.add_parser("status", help="status of a submitted job, or of every job on the cluster")
    status.add_argument("job_id", nargs="?")
    status.add_argument("--address", help=address_help)

    logs = sub.add_parser("logs", help="logs of a submitted job")
    logs.add_argument("job_id")
    logs.add_argument("--address", help=address_help)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def _submit(args) -> int:
    from llava_core import submit

    load_workflow(args.workflow, args.overrides)  # a bad workflow fails here, not minutes later on the cluster
    stage_args = ["--only", args.only] if args.only else ["--from", args.start] if args.start else []
    try:
        env = submit.job_env(args.env)
    except ValueError as error:
        raise WorkflowError(str(error)) from None
    if args.verbose:  # the job's environment reaches every process of the run
        env[VERBOSE_ENV] = "1"
    job_id = submit.submit(args.workflow, args.address, args.overrides, stage_args, env, args.pip, args.job_id)
    address = submit.dashboard_address(args.address)
    print(f"submitted {job_id} to {address}\n  follow: llava-ray logs {job_id} --follow --address {address}"
          f"\n  status: llava-ray status {job_id} --address {address}", flush=True)
    if not args.wait:
        return 0
    submit.print_logs(args.address, job_id, follow=True)
    final = submit.wait(args.address, job_id, timeout_s=60)
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def _job_command(args) -> int:
    from llava_core import submit

    if args.command == "status":
        print("\n".join(submit.status_lines(args.address, args.job_id)) or "no jobs")
    else:
        submit.print_logs(args.address, args.job_id, args.follow)
    return 0


def _validate(args) -> int:
    from llava_core import preflight

    try:
        workflow = preflight.check_file(args.workflow, args.overrides, check_remote=args.check_remote)
    except WorkflowError as error:
        print(f"error: {args.workflow}: {error}", file=sys.stderr)
        return 2
    print(f"{args.workflow}: valid; run directory {workflow.run_dir}")
    if args.plan:
        from llava_core.plan import build_plan, format_plan

        try:
            plan = build_plan(workflow, gpu=args.gpu, mfu=args.mfu)
        except (KeyError, WorkflowError) as error:
            print(f"error: {error.args[0]}", file=sys.stderr)
            return 2
        print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def _schema(args) -> int:
    from llava_core import reference

    sys.stdout.write(reference.markdown() + "\n" if args.markdown else reference.json_schema_text())
    return 0


def serve_settings(args):
    """The workflow's `serve:` section (if given), then --set overrides, then the explicit flags."""
    import yaml

    from llava_core.config import apply_overrides, read_yaml, serve_settings_from_dict

    data = {}
    if args.workflow:
        try:
            with open(args.workflow) as f:
                data = (read_yaml(f) or {}).get("serve") or {}
        except (OSError, yaml.YAMLError) as error:
            raise WorkflowError(f"--workflow {args.workflow}: {error}") from None
    # `--set serve.port=9000` and `--set port=9000` mean the same here.
    data = apply_overrides(data, [o.removeprefix("serve.") for o in args.overrides])
    flags = {"host": args.host, "port": args.port, "model_name": args.model_name, "api_key_env": args.api_key_env,
             "api_key_file": args.api_key_file}
    data.update({key: value for key, value in flags.items() if value is not None})
    if args.config_out:
        data.setdefault("host", "0.0.0.0")  # a config file is for a cluster, where the proxy must be reachable
    return serve_settings_from_dict(data)


def _serve(args) -> int:
    from llava_core.serve.deploy_config import default_model_name, resolve_model_dir

    settings = serve_settings(args)
    try:
        model_dir = resolve_model_dir(args.model_dir)
    except FileNotFoundError as error:
        raise WorkflowError(str(error)) from None
    name = settings.model_name or default_model_name(model_dir)
    if args.config_out:
        from llava_core.serve.deploy_config import serve_config, write_serve_config

        write_serve_config(args.config_out, serve_config(model_dir, settings, name))
        print(f"wrote {args.config_out} ({settings.engine} engine, model '{name}' from {model_dir}); "
              f"deploy it with: serve deploy {args.config_out}")
        return 0
    init_ray()
    from llava_core.serve.client import deploy

    url = deploy(model_dir, settings, name)
    from llava_core.serve.client import auth_line, serve_until_interrupted

    print(f"serving '{name}' at {url}/v1/chat/completions\n{auth_line(settings)}", flush=True)

    serve_until_interrupted()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # read by configure_logging here and, through init_ray, in every Ray process
    configure_logging()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command in ("status", "logs"):
            return _job_command(args)
        if args.command == "submit":
            return _submit(args)
        if args.command == "schema":
            return _schema(args)
        if args.command == "validate":
            return _validate(args)
        workflow = load_workflow(args.workflow, args.overrides)
    except WorkflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from llava_core.workflow import run_workflow

    try:
        summary = run_workflow(workflow, only=args.only, start=args.start, exit_after_serve=args.exit_after_serve)
    except WorkflowError as error:  # found once the run directory is known (a stage's missing input)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
