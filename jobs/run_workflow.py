"""Entrypoint of a llava-ray Ray Job: `python jobs/run_workflow.py WORKFLOW.yaml [--set k=v ...] [--only STAGE]`.

Used by `ray job submit ... -- python jobs/run_workflow.py workflow.yaml` and by the KubeRay RayJob in
`cluster/rayjob.yaml`. It connects to the cluster it runs on (RAY_ADDRESS is set by the Jobs server), runs every stage
of the workflow, and exits after the serve stage's demo request: a long-lived endpoint is a RayService
(`cluster/rayservice.yaml`), not a job. `llava-ray submit` runs the same command through the Jobs SDK.
"""
import sys

from llava_core.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--exit-after-serve" not in args:
        args.append("--exit-after-serve")
    sys.exit(main(["run", *args]))
