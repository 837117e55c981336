"""A training stage's checkpoints: written to node-local scratch, uploaded to the run's storage while training goes on,
and on resume fetched rank by rank, each node taking only its own ranks' ZeRO shards.

At the real size a checkpoint is large (LLaVA-1.5-7B's instruct stage: 12 bytes of fp32 Adam state and 2 of bf16
weights per trained parameter, ~95 GB, 1/world of it per rank) and the container's own disk is small and slow. So
every rank writes its shard under `scaling.local_dir` (NVMe on the cluster files), Ray Train uploads it
asynchronously (`CheckpointUploadMode.ASYNC`: the GPUs go back to training once the shard is on local disk) and
deletes the local copy once uploaded. Resuming, a rank reads only what DeepSpeed will load on it: its own
`zero_pp_rank_<rank>_*` files, and the rank-independent files (ZeRO 0-2's `mp_rank_00_model_states.pt`,
`train_state.json`), fetched once per node by its local rank 0. `Checkpoint.as_directory()` would download every
rank's shards onto every node (8 x 95 GB onto one node at 8 nodes).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import pyarrow.fs as pafs
import ray.train
import torch

DS_TAG = "deepspeed"
STATE_FILE = "train_state.json"
RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank file names (model states and optimizer)


def scratch_dir(local_dir: str) -> str:
    """Where checkpoints are written and fetched on this node: `scaling.local_dir`, or the system temp directory."""
    directory = local_dir or tempfile.gettempdir()
    os.makedirs(directory, exist_ok=True)
    return directory


def new_directory(scratch: str, step: int) -> str:
    """A fresh directory for this rank's part of the step's checkpoint (Ray Train deletes it once uploaded)."""
    return tempfile.mkdtemp(prefix=f"llava-ray-checkpoint-{step}-", dir=scratch)


def report(metrics: dict, directory: str, final: bool) -> None:
    """Hand this rank's part of the checkpoint to Ray Train. The final one (the step counter and history only, the
    stage output holds the weights) uploads before the stage returns; the others in the background."""
    from ray.train import CheckpointUploadMode

    mode = CheckpointUploadMode.SYNC if final else CheckpointUploadMode.ASYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)


def files_for_rank(relative_paths: list[str], rank: int, fetches_shared: bool) -> list[str]:
    """The checkpoint files DeepSpeed reads on `rank`: its own per-rank files, and the shared ones where this rank
    fetches them for its node."""
    chosen = []
    for path in relative_paths:
        match = RANK_FILE.search(os.path.basename(path))
        if (match and int(match.group(1)) == rank) or (match is None and fetches_shared):
            chosen.append(path)
    return chosen


def fetch_for_rank(checkpoint, rank: int, local_rank: int, scratch: str) -> str:
    """This rank's files of `checkpoint` in a node-local directory shared by the node's ranks (the caller waits for
    every rank before DeepSpeed reads it)."""
    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    relative = [info.path[len(root) + 1:] for info in listed if info.type == pafs.FileType.File]
    node = ray.get_runtime_context().get_node_id()  # nodes may share a machine (and this directory) in tests
    into = os.path.join(scratch, "llava-ray-resume", f"{os.path.basename(root)}-{node[:12]}")
    for path in files_for_rank(relative, rank, fetches_shared=local_rank == 0):
        target = os.path.join(into, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(f"{root}/{path}", target, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return into


def read_latest(name: str) -> bytes | None:
    """A rank-independent file of Ray Train's latest checkpoint, read straight from storage by the rank that asks
    (small files: the step counter, the preference stage's reference sums); None without a checkpoint or file."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        return None


def restore(engine, total_steps: int, scratch: str) -> tuple[int, list]:
    """(step to start at, history so far) from Ray Train's latest checkpoint, its DeepSpeed state loaded into
    `engine`. A finished stage's checkpoint has no DeepSpeed state to load: nothing is left to train."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    state = json.loads(read_latest(STATE_FILE))
    if state["step"] < total_steps:
        context = ray.train.get_context()
        directory = fetch_for_rank(checkpoint, context.get_world_rank(), context.get_local_rank(), scratch)
        torch.distributed.barrier()  # the node's shared files are there (its local rank 0 fetched them)
        engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False)
        torch.distributed.barrier()  # every rank of the node has read the directory
        if context.get_local_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)
    return state["step"], state["history"]
