"""Failure injection from outside the training loop: a Ray Train callback that SIGKILLs a worker process once the
controller has registered a given checkpoint, and logs every report and failure it sees to a file the test reads.

It runs in Ray Train's controller process (`ray.train.UserCallback`), inside the controller's poll of the workers:
the checkpoint is registered before `after_report` runs, and no later report can be registered until it returns,
so a worker killed here always restarts the group from exactly that checkpoint, whatever step the ranks have reached.
Ray finds the worker processes (its state API); the loop has no test code in it. Kept free of heavy imports: the
controller unpickles it by importing this module.
"""
from __future__ import annotations

import json
import os
import signal
import time

import ray
from ray.train import UserCallback

TRAIN_WORKER_CLASS = "RayTrainWorker"  # Ray Train's worker actor


def train_worker_pids() -> list[int]:
    """The pids of the live Ray Train worker processes of this session's cluster, lowest first."""
    from ray.util.state import list_actors

    # This session's cluster, named explicitly: other Ray instances may run on the same machine.
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", TRAIN_WORKER_CLASS), ("state", "=", "ALIVE")])
    return sorted(actor.pid for actor in actors)


class KillWorkerAfterCheckpoint(UserCallback):
    """SIGKILL one worker (the lowest pid: which rank does not matter, every rank restores the same checkpoint) the
    first time the checkpoint of each step in `kill_at` is reported in this run. Appends one JSON line per report
    (`step`, `time`, `killed`: the pid or None) and per failure seen (`failed_ranks`, `errors`) to `log_path`."""

    def __init__(self, log_path: str, kill_at: tuple[int, ...] = ()):
        self.log_path, self.pending = log_path, set(kill_at)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        step, killed = metrics[0]["step"], None
        if checkpoint is not None and step in self.pending:
            self.pending.discard(step)  # this object lives in the controller for the whole run: one kill per step
            killed = train_worker_pids()[0]
            os.kill(killed, signal.SIGKILL)
        self.log({"event": "report", "step": step, "checkpoint": checkpoint is not None, "killed": killed})

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.log({"event": "failure", "failed_ranks": sorted(worker_exceptions),
                  "errors": [f"{type(e).__name__}: {e}"[:300] for e in worker_exceptions.values()]})

    def log(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")


def read_log(log_path: str) -> list[dict]:
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]
