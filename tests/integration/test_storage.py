"""S3 storage against a real S3 protocol server (moto): one client per process and settings; remote model directories
mirrored for `from_pretrained` (a rewritten directory is fetched again, never stale), once per node."""
import os

from llava_core import storage
from tests.s3_server import environment, s3_server


def test_a_rewritten_remote_directory_is_downloaded_again(tmp_path):
    with s3_server("cache-test") as env, environment(env):
        remote = "s3://cache-test/runs/quickstart/align/model"
        storage.write_text(storage.join(remote, "config.json"), '{"patch_size": 8}')
        storage.write_text(storage.join(remote, "weights.bin"), "old weights")
        first = storage.local_copy(remote, str(tmp_path))
        assert open(os.path.join(first, "config.json")).read() == '{"patch_size": 8}'
        assert storage.local_copy(remote, str(tmp_path)) == first  # unchanged: the same copy, not a new download

        storage.write_text(storage.join(remote, "config.json"), '{"patch_size": 16}')  # the stage ran again
        second = storage.local_copy(remote, str(tmp_path))
        assert second != first
        assert open(os.path.join(second, "config.json")).read() == '{"patch_size": 16}'
        assert sorted(os.listdir(second)) == ["config.json", "weights.bin"]
        assert not [name for name in os.listdir(os.path.dirname(second)) if name.startswith(".partial-")]


def test_one_client_serves_every_path_of_a_bucket_and_a_round_trip_works(clean_s3):
    with s3_server("client-test") as env, environment(env):
        first, inner = storage.filesystem("s3://client-test/runs/a.json")
        second, _ = storage.filesystem("s3://client-test/images/b.jpg")
        assert first is second and inner == "client-test/runs/a.json"
        storage.write_json("s3://client-test/runs/a.json", {"rows": 3})
        assert storage.read_json("s3://client-test/runs/a.json") == {"rows": 3}
        assert storage.list_files("s3://client-test/runs") == ["s3://client-test/runs/a.json"]
        with environment({"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}):
            assert storage.filesystem("s3://client-test/runs/a.json")[0] is not first  # another server
        with environment({"AWS_ACCESS_KEY_ID": "rotated"}):
            assert storage.filesystem("s3://client-test/runs/a.json")[0] is not first  # other keys
        assert storage.filesystem("s3://client-test/runs/a.json")[0] is first  # back as it was


def test_without_weights_copies_only_the_small_files(tmp_path):
    with s3_server("cache-test") as env, environment(env):
        remote = "s3://cache-test/hub/lmsys/vicuna-7b-v1.5"
        for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "pytorch_model-00001-of-00002.bin",
                     "pytorch_model.bin.index.json", "model.safetensors"):
            storage.write_text(storage.join(remote, name), name)
        small = storage.local_copy(remote, str(tmp_path), without_weights=True)
        assert sorted(os.listdir(small)) == ["config.json", "pytorch_model.bin.index.json", "tokenizer.model",
                                             "tokenizer_config.json"]
        full = storage.local_copy(remote, str(tmp_path))
        assert full != small and len(os.listdir(full)) == 6  # a full copy is never served from the small one


def test_processes_of_one_node_download_a_model_once(tmp_path, monkeypatch):
    """8 ranks of a GPU node asking at once: one downloads, the others wait for its copy (one file lock)."""
    import threading

    with s3_server("cache-test") as env, environment(env):
        remote = "s3://cache-test/runs/r/instruct/model"
        storage.write_text(storage.join(remote, "config.json"), "{}")
        copies, real_copy = [], storage.copy_dir

        def counted_copy(src, dst):
            copies.append(src)
            real_copy(src, dst)
        monkeypatch.setattr(storage, "copy_dir", counted_copy)
        results = []
        threads = [threading.Thread(target=lambda: results.append(storage.local_copy(remote, str(tmp_path))))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(results)) == 1 and len(results) == 4
        assert copies == [remote]
