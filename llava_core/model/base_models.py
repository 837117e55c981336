"""Where the base models come from: the same location for every process of a run, on every node.

A base model given as a storage URI or a local path is read from there (a local path only works where every node
sees the same disk). A hub id (`lmsys/vicuna-7b-v1.5`) is read from the workflow's mirror (`model.mirror:
s3://bucket/hub` holds `s3://bucket/hub/lmsys/vicuna-7b-v1.5/`) or, without one, fetched from the hub once per run
by one Ray task into `<run dir>/base_models/<hub id>/`: 8 ranks on each of N nodes never all pull 14 GB from the hub.
Each process then mirrors the URI to its own disk (`storage.local_copy`).
"""
from __future__ import annotations

import os
import tempfile

from llava_core import storage

FETCHED_MARKER = "_fetched.json"


def looks_local(model: str) -> bool:
    """Hub ids are `org/name`; anything else (absolute, relative with more parts, existing) is a path."""
    return model.startswith(("/", ".", "~")) or model.count("/") != 1 or os.path.exists(model)


def is_hub_id(name: str) -> bool:
    """`org/name` that is neither a URI nor a path on this machine."""
    return not storage.is_remote(name) and not looks_local(name)


def base_model_location(name: str, mirror: str, run_dir: str) -> str:
    if not is_hub_id(name):
        return storage.absolute(name)
    if mirror:
        return storage.join(mirror, name)
    target = storage.join(run_dir, "base_models", name)
    if not storage.exists(storage.join(target, FETCHED_MARKER)):
        import ray

        print(f"fetching {name} from the hub once for this run, into {target}", flush=True)
        fetch = ray.remote(num_cpus=1)(fetch_from_hub).options(runtime_env={"env_vars": storage.s3_env()})
        ray.get(fetch.remote(name, target))
    return target


def fetch_from_hub(hub_id: str, target: str) -> None:
    """Download a hub repo's files (weights, configs, tokenizer) and copy them to `target`, marker last."""
    from huggingface_hub import snapshot_download

    with tempfile.TemporaryDirectory() as local:
        snapshot_download(hub_id, local_dir=local, allow_patterns=["*.json", "*.model", "*.txt", "*.safetensors",
                                                                 "*.bin", "*.jinja"])
        storage.copy_dir(local, target)
        storage.write_json(storage.join(target, FETCHED_MARKER), {"hub_id": hub_id, "files": sorted(os.listdir(local))})
