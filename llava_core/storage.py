"""One way to read and write run data, whether it lives on local disk or in S3 (`s3://bucket/prefix`).

Everything goes through pyarrow's filesystem layer, the same one Ray Data and Ray Train use, so a path that works
for one stage works for all of them. `AWS_ENDPOINT_URL` points it at an S3-compatible server (MinIO, moto).
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from typing import Any

import pyarrow.fs as pafs


def is_remote(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def absolute(path: str) -> str:
    """Ray workers may run in another working directory: hand them absolute paths."""
    return path if is_remote(path) else os.path.abspath(path)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `path` and the path inside it."""
    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if path.startswith("s3://"):
        inner = path[len("s3://"):]
        return s3_filesystem(inner.split("/", 1)[0]), inner
    return pafs.FileSystem.from_uri(path)


S3_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
S3_SETTING_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def s3_env() -> dict:
    """The driver's S3 endpoint and region, for Ray workers started before they were set (or on other nodes).

    Never its credentials: a task's `runtime_env` is shown by the dashboard and kept in the GCS. Workers get
    credentials the way the cluster gives them to every process: environment variables from a secret on every pod,
    an instance role or IRSA (see cluster/), or, for a local Ray, the environment it was started in."""
    return {name: os.environ[name] for name in S3_SETTING_VARS if os.environ.get(name)}


def s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    """This process's S3 client for `bucket` under the current environment.

    The region is resolved, never guessed: a bucket outside the guessed region answers every request with HTTP 301.
    A custom endpoint (MinIO, moto) has no bucket regions to ask, so there the SDK's own default stands.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        region = bucket_region(bucket)
    return _s3_client(endpoint, region, *(os.environ.get(name) for name in S3_CREDENTIAL_VARS))


@functools.cache
def bucket_region(bucket: str) -> str:
    """One HEAD request per bucket and process: the answer does not change while we run."""
    return pafs.resolve_s3_region(bucket)


@functools.cache
def _s3_client(endpoint: str | None, region: str | None, *credentials: str | None) -> pafs.S3FileSystem:
    """One client per process and settings: every image read reuses its connections instead of opening new ones.

    The credentials are only the cache key (changed keys must get a new client); the SDK reads them from the
    environment itself, and falls back to its chain (IRSA web identity, instance profile) when they are unset.
    """
    return pafs.S3FileSystem(endpoint_override=endpoint, **({"region": region} if region else {}))


# pyarrow finalises S3 at exit and may hang on clients still alive then (apache/arrow#50188); drop ours first
# (atexit runs last-registered first, and pyarrow.fs registered its handler on import, above).
atexit.register(_s3_client.cache_clear)


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    """A folder (on S3: a prefix with objects below it)."""
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def size(path: str) -> int:
    """A file's size in bytes, from its metadata (one HEAD request on S3): checked before a large read."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return info.size


def makedirs(path: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    fs, inner = filesystem(path)
    parent = posixpath.dirname(inner) if is_remote(path) else os.path.dirname(inner)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _file_infos(path: str) -> tuple[str, list[pafs.FileInfo]]:
    """The filesystem path of `path` and the infos of the files below it (recursively); none if it is absent."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return inner, []
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    return inner, [i for i in infos if i.type == pafs.FileType.File]


def list_files(path: str, suffix: str = "") -> list[str]:
    """Files below `path` (recursively), as full paths in the same scheme as `path`, sorted."""
    found = sorted(i.path for i in _file_infos(path)[1] if i.path.endswith(suffix))
    if is_remote(path):
        scheme = path.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in found]
    return found


def delete_dir(path: str) -> None:
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)


def copy_dir(src: str, dst: str) -> None:
    """Copy a directory tree between any two locations (local <-> s3 included)."""
    src_fs, src_inner = filesystem(src)
    dst_fs, dst_inner = filesystem(dst)
    dst_fs.create_dir(dst_inner, recursive=True)
    pafs.copy_files(src_inner, dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)


def cache_root() -> str:
    """This process's own cache for mirrored model directories: every node (and pod) has its own disk."""
    return os.path.join(os.path.expanduser("~"), ".cache", "llava-ray")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


def local_copy(path: str, cache_dir: str | None = None, without_weights: bool = False) -> str:
    """A local directory holding the contents of `path`; remote paths are downloaded under `cache_dir` (default:
    this process's `cache_root()`, never a path chosen on another machine). `without_weights` copies only the small
    files (configs, tokenizer, processor): what a data-preparation actor needs of a 14 GB model repo.

    transformers' `from_pretrained` needs local files, so model directories in S3 are mirrored first. The copy is
    named after the remote listing (names, sizes, modification times): a stage that ran again with other settings
    writes the same path, and must not be served the old copy. One process per node downloads while the others
    (8 ranks of a GPU node) wait on a file lock and then find the finished copy; copies land in a temporary
    directory and are renamed into place, so nobody ever reads a half-written one.
    """
    if not is_remote(path):
        return path
    files = [f for f in listing(path) if not (without_weights and f[0].endswith(WEIGHT_SUFFIXES))]
    version = hashlib.sha1(json.dumps(files).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir or cache_root(), path.replace("://", "/").strip("/"), version)
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(target):
            staging = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(target))
            try:
                if without_weights:
                    for name, _, _ in files:
                        write_local(os.path.join(staging, name), read_bytes(join(path, name)))
                else:
                    copy_dir(path, staging)
                os.rename(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def listing(path: str) -> list[tuple[str, int, int | None]]:
    """(relative name, size, modification time in ns) of every file under a directory, sorted."""
    inner, infos = _file_infos(path)
    files = [(i.path[len(inner):].lstrip("/"), i.size, i.mtime_ns) for i in infos]
    if not files:
        raise FileNotFoundError(f"{path}: no files there")
    return sorted(files)
