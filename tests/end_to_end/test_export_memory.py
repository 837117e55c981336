"""The driver is small: exporting a 3 GiB model adds less than 100 MiB to the driver (the export runs as a Ray task
and copies files; nothing is loaded)."""
import json
import os
import struct
import subprocess
import sys

from tests.ray_cluster import AUTH_ENV

MODEL_BYTES = 3 * 2**30  # 3 GiB of weights: a 1.5B model in bf16
# What exporting may add to the driver once it is connected. (Connecting itself costs what the cluster holds: from
# 130 MiB on a fresh Ray to 900 MiB after the suite's earlier tests, measured; it is not the export's doing.)
EXPORT_BOUND = 100 * 2**20


def write_large_checkpoint(directory: str, num_bytes: int) -> int:
    """An HF model directory whose safetensors file holds one `num_bytes` bf16 tensor, written sparse (no RAM,
    no time): a valid file that every reader sees at its full size. Returns the parameter count."""
    os.makedirs(directory)
    rows = num_bytes // (2 * 4096)
    header = json.dumps({"lm_head.weight": {"dtype": "BF16", "shape": [rows, 4096],
                                            "data_offsets": [0, rows * 4096 * 2]}}).encode()
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + rows * 4096 * 2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "llava", "dtype": "bfloat16", "image_seq_length": 576}, f)
    return rows * 4096


DRIVER = """
import json, resource, sys
import ray
from llava_core.model.export import export_hf
ray.init(address=sys.argv[1])
connected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
metrics = export_hf(sys.argv[2], sys.argv[3])
print(json.dumps({"metrics": metrics, "connected_rss": connected,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_export_of_a_large_model_keeps_the_driver_small(ray_session, tmp_path):
    parameters = write_large_checkpoint(str(tmp_path / "instruct" / "model"), MODEL_BYTES)
    gcs = ray_session.get_runtime_context().gcs_address
    run = subprocess.run([sys.executable, "-c", DRIVER, gcs, str(tmp_path / "instruct"), str(tmp_path / "export")],
                         env={**os.environ, **AUTH_ENV}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["metrics"]["parameters"] == parameters
    assert result["metrics"]["dtype"] == "bfloat16"
    assert os.path.getsize(tmp_path / "export" / "model.safetensors") > MODEL_BYTES * 0.99
    print(f"driver peak RSS {result['peak_rss'] / 2**20:.0f} MiB while exporting {MODEL_BYTES / 2**30:.0f} GiB "
          f"({result['connected_rss'] / 2**20:.0f} MiB once connected)")
    added = result["peak_rss"] - result["connected_rss"]
    assert added < EXPORT_BOUND < MODEL_BYTES / 30, f"exporting added {added / 2**20:.0f} MiB to the driver"
    assert result["peak_rss"] < MODEL_BYTES / 2  # whatever connecting cost, the model was never in the driver
