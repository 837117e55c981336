"""The prepare stage on Ray Data: raw LLaVA rows -> validated, tokenized, label-masked parquet shards.

A dataset is one source or a mixture of sources (each with its image folder and sampling). Every source is first
streamed once into arrow blocks of raw rows in the object store (`sources.staged_blocks`); a pool of
`RowPreparer` actors turns each row into an example or a rejection, written in one streaming pass (every dataset of
a run through one pool, each row with its own dataset's settings). Per dataset it writes
`<out>/rows/dataset=<name>/status=written/*.parquet` (the shards), `<out>/rows/dataset=<name>/status=rejected/`,
`<out>/<name>/rejects.jsonl` (every rejected row with its reason, row id, source and index),
`<out>/<name>/plan_index.parquet` (every written row's location, length and image count, for the trainer) and counts
in `<out>/manifest.json`, with `rows_in == rows_written + rows_rejected` for the dataset and for every source.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import urllib.parse
from collections import Counter

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from llava_core import plots, storage
from llava_core.config import SourceSettings, dataset_sources
from llava_core.data.plan_index import INDEX_NAME, write_plan_index
from llava_core.data.rows import ROW_GROUP_ROWS, RowPreparer, RowSettings
from llava_core.data.sources import keep_indices, select_indices, staged_blocks
from llava_core.progress import REPORT_EVERY_S, RowProgress

log = logging.getLogger(__name__)

DATASET_COLUMN = "dataset"  # the staged rows' tag, and the first partition of the written rows


class TooManyRejects(RuntimeError):
    pass


def prepare_dataset(name: str, sources: list[SourceSettings], vision_path: str, llm_path: str, settings: RowSettings,
                    out_dir: str) -> tuple[dict, np.ndarray]:
    """Prepare one dataset (a mixture of sources) with its settings: its manifest entry and every row's length."""
    return prepare_datasets({name: (sources, settings)}, vision_path, llm_path, out_dir)[name]


def prepare_datasets(datasets: dict[str, tuple[list[SourceSettings], RowSettings]], vision_path: str, llm_path: str,
                     out_dir: str) -> dict[str, tuple[dict, np.ndarray]]:
    """Prepare every dataset (each a mixture of sources, with its settings: the workflow's `prepare` section, its
    template and kind, the model's family) in one streaming pass through one pool of actors: a pool costs its
    actors' start (~5-7 s here: a process, transformers, the processor), once per run rather than once per dataset.
    Returns each dataset's manifest entry and the token length of every row it wrote."""
    rows_dir = storage.join(out_dir, "rows")
    for path in (rows_dir, *(storage.join(out_dir, name) for name in datasets)):
        storage.delete_dir(path)  # a re-run replaces, never appends to, an earlier attempt
    start = time.perf_counter()
    blocks, selected = [], {}
    for name, (sources, _) in datasets.items():
        blocks += _stage_dataset(name, sources, selected.setdefault(name, {}))
    rows_total = sum(len(s) for chosen in selected.values() for s in chosen.values())

    counter = RowCounter.remote()
    prepared = ray.data.from_arrow_refs(blocks).map_batches(
        CountedRowPreparer,
        fn_constructor_kwargs={"counter": counter, "vision_path": vision_path, "llm_path": llm_path,
                               "settings": {name: settings for name, (_, settings) in datasets.items()}},
        batch_format="pyarrow",
        batch_size=32,
        compute=ActorPoolStrategy(size=max(settings.num_actors for _, settings in datasets.values())),
        num_cpus=1,
        **_worker_env(),
    )
    # Rows reach the shards in source order, whichever actor finishes its batch first: the batch plan draws its
    # seeded order over the shards' rows, so without this the same seed trains on other batches every run. Ray
    # holds a finished batch back until the ones before it are written (a few batches per actor in the object store).
    prepared.context.execution_options.preserve_order = True
    with reporting_rows(f"prepare {', '.join(datasets)}", rows_total, counter):
        _write_streaming(prepared, rows_dir, min(s.rows_per_shard for _, s in datasets.values()))
    files = {name: storage.list_files(dataset_rows(rows_dir, name), ".parquet") for name in datasets}  # one listing
    shards = {name: [f for f in files[name] if f.rsplit("/", 2)[-2] == "status=written"] for name in datasets}
    # On workers, every dataset's at once, while the driver reads the summaries: a scan is ~one request per row group
    # on S3 (83K for LLaVA-1.5's 665K rows).
    indexes = {name: _start_plan_index(shards[name], storage.join(out_dir, name)) for name in datasets}
    log.info("prepare: %d rows written in %.1f s", rows_total, time.perf_counter() - start)
    return {name: _finish_dataset(name, sources, settings.template, selected[name], files[name], shards[name],
                                  indexes[name], storage.join(out_dir, name))
            for name, (sources, settings) in datasets.items()}


def tagged(table: pa.Table, dataset: str) -> pa.Table:
    """`table` with every row tagged with its dataset (the staged rows for the pool, the prepared ones for the
    partitioned write)."""
    return table.append_column(DATASET_COLUMN, pa.repeat(dataset, table.num_rows))


def dataset_rows(rows_dir: str, name: str) -> str:
    """Where the partitioned write put a dataset's rows (pyarrow's hive partitioning escapes the value as a URI)."""
    return storage.join(rows_dir, f"{DATASET_COLUMN}={urllib.parse.quote(name, safe='')}")


def _stage_dataset(name: str, sources: list[SourceSettings], selected: dict) -> list:
    """The dataset's sampled rows as blocks in the object store, each row tagged with the dataset's name; `selected`
    gets each source's chosen row indices."""
    blocks = []
    for source in sources:
        source_blocks, total = _stage(source, name)
        selected[source.path] = select_indices(source.sampling, total, source.seed)
        if len(selected[source.path]) < total:
            source_blocks = [ray.put(keep_indices(ray.get(ref), selected[source.path])) for ref in source_blocks]
        blocks += source_blocks
        log.info("prepare %s: %s: %d rows, %d sampled (%s)", name, source.path, total, len(selected[source.path]),
                 source.sampling)
    if not sum(len(s) for s in selected.values()):
        raise ValueError(f"dataset {name!r}: its sources hold no rows ({', '.join(s.path for s in sources)})")
    return blocks


def _start_plan_index(shards: list[str], dataset_dir: str) -> tuple:
    """The plan index task of a dataset's shards, started: (its result's ref, the index's path)."""
    path = storage.absolute(storage.join(dataset_dir, INDEX_NAME))  # the task may run in another directory
    return _plan_index_task.options(**_worker_env()).remote(shards, path), path


def _finish_dataset(name: str, sources, template: str, selected: dict, files: list[str], shards: list[str],
                    index: tuple, dataset_dir: str) -> tuple[dict, np.ndarray]:
    """A written dataset's rejects and manifest entry, once its plan index (`index`, started) holds every row; and
    its rows' lengths. `files`: every file of its rows (written and rejected), `shards` the written ones."""
    index_rows, index_path = index
    # The small columns of every row, read back from the files: the rejects and every count of the manifest.
    summary = _read_columns(files,
                            ["id", "source", "index", "reason", "detail", "length", "num_images", "num_supervised"])
    rejects = summary[summary["reason"] != ""].sort_values(["source", "index"])
    rejects = rejects[["id", "source", "index", "reason", "detail"]].to_dict("records")
    storage.write_text(storage.join(dataset_dir, "rejects.jsonl"),
                       "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    written = summary[summary["reason"] == ""]
    indexed = ray.get(index_rows)
    if indexed != len(written):
        raise RuntimeError(f"dataset {name!r}: the plan index {index_path} holds {indexed} rows, the shards "
                           f"{len(written)}")
    entry = _manifest_entry(sources, template, selected, written, rejects, shards, index_path)
    return entry, np.asarray(written["length"], dtype=np.int64)


@ray.remote(num_cpus=0)
class RowCounter:
    """How many rows the preparing actors have finished: the driver's progress line reads it (the write itself runs
    in Ray Data's tasks, out of the driver's sight)."""

    def __init__(self):
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def count(self) -> int:
        return self.rows


class CountedRowPreparer:
    """The pool's actor: each dataset's rows through that dataset's RowPreparer (made on its first row: a dataset
    may start from another model, whose processor prepares it), tagged with the dataset for the partitioned write;
    it tells the RowCounter each finished batch's size (one small message per batch of 32, sent without waiting)."""

    def __init__(self, counter, vision_path: str, llm_path: str, settings: dict[str, RowSettings]):
        self.counter, self.vision_path, self.llm_path, self.settings = counter, vision_path, llm_path, settings
        self.preparers: dict[str, RowPreparer] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = batch.column(DATASET_COLUMN).to_pylist()
        parts, first = [], 0
        for end in range(1, len(names) + 1):  # a batch may straddle two datasets: each run of rows to its own
            if end == len(names) or names[end] != names[first]:
                prepared = self.preparer(names[first])(batch.slice(first, end - first))
                parts.append(tagged(prepared, names[first]))
                first = end
        self.counter.add.remote(batch.num_rows)
        return pa.concat_tables(parts)

    def preparer(self, name: str) -> RowPreparer:
        if name not in self.preparers:
            self.preparers[name] = RowPreparer(self.vision_path, self.llm_path, self.settings[name])
        return self.preparers[name]


@contextlib.contextmanager
def reporting_rows(label: str, total: int, counter, every_s: float = REPORT_EVERY_S):
    """A progress line (`llava_core.progress`) every `every_s` seconds while the body runs, read from `counter`, and
    a last one when it has finished; the driver only asks for a number."""
    progress, stop = RowProgress(label, "row", total, time.time(), every_s), threading.Event()

    def report() -> None:
        while not stop.wait(every_s):
            # a retried batch (an actor lost mid-way) is counted twice: never more than every row
            line = progress.report(min(ray.get(counter.count.remote()), total), time.time())
            if line:
                log.info(line)

    thread = threading.Thread(target=report, name="prepare-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        ray.kill(counter)
    log.info(progress.report(total, time.time()))  # the write has finished: every row is prepared and written


def _write_streaming(prepared, rows_dir: str, rows_per_shard: int) -> None:
    """One streaming pass: written rows to `rows/dataset=<name>/status=written/` (the shards), rejected ones (tiny:
    no tokens, no pixels) to `.../status=rejected/`. Nothing is materialised: at 665K images that would be ~225 GB
    of pixels."""
    import warnings

    fs, path = storage.filesystem(rows_dir)
    with warnings.catch_warnings():
        # Ray suggests a repartition by key instead of min_rows_per_file with partitions: that is a shuffle, i.e.
        # exactly the full materialisation this write avoids.
        warnings.filterwarnings("ignore", message="Using `min_rows_per_file` with non-empty `partition_cols`")
        # Writing is I/O: with a CPU reserved, the writes wait for an actor to finish and pile up at the end.
        # row_group_size goes to pyarrow's write_dataset as min and max rows per group (small: the trainer reads
        # rows at random, a group at a time); without it a shard would be one row group.
        prepared.write_parquet(path, filesystem=fs, partition_cols=[DATASET_COLUMN, "status"],
                               min_rows_per_file=rows_per_shard, row_group_size=ROW_GROUP_ROWS,
                               ray_remote_args={"num_cpus": 0})


def _read_columns(paths: list[str], columns: list[str]):
    import pandas as pd
    import pyarrow.parquet as pq

    tables = []
    for path in paths:
        fs, inner = storage.filesystem(path)
        tables.append(pq.read_table(inner, filesystem=fs, columns=columns))
    return pd.concat([t.to_pandas() for t in tables], ignore_index=True) if tables else pd.DataFrame(columns=columns)


# A CPU, so it runs on a worker node and never on a head started with none: the driver coordinates.
_plan_index_task = ray.remote(num_cpus=1)(write_plan_index)


def _worker_env() -> dict:
    """Images in S3 are read by the actors: hand them the driver's endpoint and credentials when it has any."""
    env = storage.s3_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def _stage(source: SourceSettings, dataset: str) -> tuple[list, int]:
    """Stream a source file once into blocks in the object store, each row tagged with its dataset: no process holds
    the whole file."""
    refs, total = [], 0
    for block in staged_blocks(source):
        refs.append(ray.put(tagged(block, dataset)))
        total += block.num_rows
    return refs, total


def _counts(rows_in: int, written, rejects: list[dict]) -> dict:
    counts = {
        "rows_in": rows_in,
        "rows_written": int(len(written)),
        "rows_rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "text_only_rows": int((written["num_images"] == 0).sum()),
        "tokens": int(written["length"].sum()),
        "supervised_tokens": int(written["num_supervised"].sum()),
        "longest_row": int(written["length"].max()) if len(written) else 0,  # what training memory must fit
    }
    assert counts["rows_in"] == counts["rows_written"] + counts["rows_rejected"], counts  # nothing may vanish
    return counts


def _manifest_entry(sources, template, selected, written, rejects, shards, plan_index) -> dict:
    per_source = {}
    for source in sources:
        mine = [r for r in rejects if r["source"] == source.path]
        per_source[source.path] = {"sampling": source.sampling,
                                   **_counts(len(selected[source.path]), written[written["source"] == source.path],
                                             mine)}
    entry = {
        "source": sources[0].path if len(sources) == 1 else [s.path for s in sources],
        "template": template,
        **_counts(sum(len(s) for s in selected.values()), written, rejects),
        "max_length": int(written["length"].max()) if len(written) else 0,
        "sources": per_source,
        "shards": shards,
        "plan_index": plan_index,  # what training ranks read instead of every shard's footer (data/plan_index.py)
    }
    return entry


def check_reject_fraction(manifest: dict, max_fraction: float) -> None:
    for name, entry in manifest["datasets"].items():
        fraction = entry["rows_rejected"] / max(entry["rows_in"], 1)
        if fraction > max_fraction:
            raise TooManyRejects(
                f"dataset {name!r}: {entry['rows_rejected']} of {entry['rows_in']} rows rejected ({fraction:.1%}) "
                f"> prepare.max_reject_fraction {max_fraction:.1%}; reasons {entry['rejected_by_reason']}; "
                f"see {entry['source']} rows listed in rejects.jsonl"
            )


def length_stats(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {}
    q = np.percentile(lengths, [50, 90, 99]).tolist()
    return {"min": int(lengths.min()), "p50": q[0], "p90": q[1], "p99": q[2], "max": int(lengths.max()),
            "mean": float(lengths.mean())}


def run_prepare(workflow, vision_path: str, llm_path: str, out_dir: str, checkpoints: dict | None = None) -> dict:
    """The prepare stage: every dataset of the workflow, then the manifest, length statistics and their plot.
    `checkpoints`: dataset name -> the model its stage starts from (its processor prepares the dataset)."""
    p = workflow.prepare
    datasets = {}
    for name, dataset in workflow.datasets.items():
        # Every prepare setting reaches the rows, with the dataset's template and the model's family.
        settings = RowSettings(**dataclasses.asdict(p), template=dataset.template, family=workflow.model.family,
                               kind=dataset.kind, checkpoint=(checkpoints or {}).get(name, ""))
        datasets[name] = (dataset_sources(dataset), settings)
    prepared = prepare_datasets(datasets, vision_path, llm_path, out_dir)
    manifest = {"datasets": {name: entry for name, (entry, _) in prepared.items()}}
    all_lengths = {name: lengths for name, (_, lengths) in prepared.items()}
    storage.write_json(storage.join(out_dir, "manifest.json"), manifest)
    storage.write_json(storage.join(out_dir, "stats.json"),
                       {name: length_stats(lengths) for name, lengths in all_lengths.items()})
    lengths_plot = plots.png(plots.lengths_figure(all_lengths, p.max_length))
    storage.write_bytes(storage.join(out_dir, "lengths.png"), lengths_plot)
    check_reject_fraction(manifest, p.max_reject_fraction)
    return {name: {k: e[k] for k in ("rows_in", "rows_written", "rows_rejected", "tokens")}
            for name, e in manifest["datasets"].items()}
