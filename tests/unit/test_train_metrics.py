"""Training metrics: FLOPs counted from the model's parameters, TensorBoard events, the progress line and its ETA,
uploads that never block a step (the loss plot: test_report; metrics synced to a real S3 server:
tests/integration/test_train_metrics.py)."""
import dataclasses
import os
import threading
import time

from llava_core import storage
from llava_core.train.metrics import MetricsWriter, flops_counter, read_history
from tests.train_metrics_helpers import STAGE, eventually, read_events, records


def test_the_runtime_counts_flops_from_the_model_parameters(tiny_dataset):
    from llava_core.model.build import assemble

    model, _ = assemble("llava", tiny_dataset["vision"], tiny_dataset["llm"])
    flops = flops_counter(model, ["projector", "llm"], lora=False)
    llm = sum(p.numel() for p in model.model.language_model.parameters())
    llm -= model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    assert flops(tokens=100, images=0, squared_lengths=0, supervised=0) == 6 * llm * 100
    # the lm_head runs at supervised positions only (train/loss.py)
    assert flops(100, 0, 0, supervised=30) - flops(100, 0, 0, supervised=0) == 6 * model.lm_head.weight.numel() * 30
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    vision_config, text = model.config.vision_config, model.config.text_config
    patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
    # the frozen tower's attention runs forward only: 4 x positions^2 x width per layer
    tower_attention = vision_config.num_hidden_layers * 4 * patches ** 2 * vision_config.hidden_size
    assert flops(100, images=2, squared_lengths=0, supervised=0) - flops(100, 0, 0, 0) == (
        6 * projector * model.config.image_seq_length * 2 + 2 * vision * patches * 2 + 2 * tower_attention)
    # the trained LLM's causal attention: 2 x s^2 x width forward per layer, 3x with its backward; two samples of
    # 30 and 70 tokens attend within themselves (30^2 + 70^2), not as one of 100
    assert flops(100, 0, squared_lengths=30 ** 2 + 70 ** 2, supervised=0) - flops(100, 0, 0, 0) == (
        3 * 2 * (30 ** 2 + 70 ** 2) * text.hidden_size * text.num_hidden_layers)


def test_tensorboard_events(tmp_path):
    history = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "grad_norm": 1.0, "mfu": None, "time": 0.0}
               for s in range(1, 6)]
    stage_dir = tmp_path / "align"
    writer = MetricsWriter("align", STAGE, str(stage_dir / "tensorboard"), str(stage_dir), history=[])
    for record in history:
        writer.write(record)
    writer.close()
    events = os.listdir(stage_dir / "tensorboard")
    assert len(events) == 1
    losses = [(e.step, v.simple_value) for e in read_events(open(stage_dir / "tensorboard" / events[0], "rb").read())
              for v in e.summary.value if v.tag == "train/loss"]
    assert [s for s, _ in losses] == list(range(1, 6))
    assert all(abs(value - 3.0 / s) < 1e-6 for s, value in losses)
    assert read_history((stage_dir / "metrics.jsonl").read_text()) == history


def test_a_slow_upload_never_blocks_a_step_and_requests_meanwhile_are_coalesced(tmp_path, monkeypatch):
    release, uploads, real_write = threading.Event(), [], storage.write_text

    def slow_write(path, text):
        uploads.append(len(read_history(text)))
        release.wait(timeout=60)  # the first upload hangs until the test lets it go
        real_write(path, text)

    monkeypatch.setattr(storage, "write_text", slow_write)
    stage_dir = tmp_path / "align"
    writer = MetricsWriter("align", dataclasses.replace(STAGE, metrics_sync_every=1), str(stage_dir / "tensorboard"),
                           str(stage_dir), history=[])
    started = time.monotonic()
    for record in records(range(1, 21)):  # a sync requested at every step
        writer.write(record)
    assert time.monotonic() - started < 2.0  # the hung upload did not hold up the steps
    assert eventually(lambda: len(uploads), 1) == 1
    time.sleep(0.5)
    assert len(uploads) == 1  # one upload in flight; the requests made meanwhile wait as one
    release.set()
    writer.close()
    assert uploads[-1] == 20 and len(uploads) <= 3  # the hung one, the latest request, the final copy
    assert read_history((stage_dir / "metrics.jsonl").read_text()) == records(range(1, 21))


RECORD = {"loss": 1.5, "lr": 2e-5, "samples_per_s": 64.0, "tokens_per_s": 50000.0, "mfu": 0.412}


def timed_steps(first_step: int, start: float, step_seconds: list[float]):
    """A window as the loop fills it with a fake clock: its first point where this attempt starts, then one per step."""
    from llava_core.progress import RateWindow
    from llava_core.train.loop import STEP_WINDOW

    window, now, step = RateWindow(STEP_WINDOW, start, first_step), start, first_step
    for seconds in step_seconds:
        now, step = now + seconds, step + 1
        window.add(now, step)
    return window, step, now


def test_the_progress_line_gives_elapsed_rate_mfu_and_an_eta_in_days_beyond_a_day():
    from llava_core.train.loop import progress_line

    # resumed at step 8: the loop started at t=1000, 5 minutes after the driver started the stage; 3 steps of 60 s
    window, step, now = timed_steps(8, 1000.0, [60.0] * 3)
    line = progress_line("instruct", {**RECORD, "step": step, "time": now}, 5011, 700.0, window)
    assert line == ("[instruct] step 11/5011 (0%) 60.00 s/step elapsed 0:08:00 ETA 3d 11:20:00 | loss 1.5000 "
                    "lr 2.00e-05 samples/s 64.0 tokens/s 50000 MFU 41.2%")  # 5000 steps x 60 s: 83 h 20 min


def test_fifty_hours_left_show_as_days_and_no_duration_wraps():
    from llava_core.progress import duration

    window, step, now = timed_steps(0, 0.0, [18.0] * 10)
    from llava_core.progress import progress_text

    assert progress_text("instruct", "step", step, 10_010, window, now).endswith("ETA 2d 02:00:00")  # 10,000 x 18 s
    assert [duration(s) for s in (0, 59.6, 3599, 86_399, 86_400, 90_061, 50 * 3600, 400 * 86_400 + 5)] == [
        "0:00:00", "0:01:00", "0:59:59", "23:59:59", "1d 00:00:00", "1d 01:01:01", "2d 02:00:00", "400d 00:00:05"]


def test_the_first_step_after_five_minutes_of_start_up_is_timed_from_the_step_alone():
    from llava_core.train.loop import progress_line

    # the driver started the stage at t=0; loading took 300 s; step 1 took 4 s
    window, step, now = timed_steps(0, 300.0, [4.0])
    line = progress_line("align", {**RECORD, "step": step, "time": now, "mfu": None}, 1001, 0.0, window)
    assert line.startswith("[align] step 1/1001 (0%) 4.00 s/step elapsed 0:05:04 ETA 1:06:40 | ")  # 1000 x 4 s
    assert "MFU" not in line


def test_after_a_resume_only_this_attempts_steps_set_the_rate():
    from llava_core.train.loop import progress_line

    # resumed at step 9000 of 10000, started 10 minutes after the stage; 2 s per step since
    window, step, now = timed_steps(9000, 600.0, [2.0] * 20)
    line = progress_line("instruct", {**RECORD, "step": step, "time": now}, 10_000, 0.0, window)
    assert " step 9020/10000 (90%) 2.00 s/step elapsed 0:10:40 ETA 0:32:40 " in line  # 980 x 2 s = 1960 s


def test_the_eta_follows_a_change_of_rate_within_the_window():
    from llava_core.progress import progress_text
    from llava_core.train.loop import STEP_WINDOW

    window, step, now = timed_steps(0, 0.0, [10.0] * 500)  # 10 s/step for 500 steps, then 2 s/step
    assert " 10.00 s/step " in progress_text("instruct", "step", step, 1500, window, now)
    for _ in range(STEP_WINDOW):
        now, step = now + 2.0, step + 1
        window.add(now, step)
    line = progress_text("instruct", "step", step, 1500, window, now)
    # the mean since the start (5100 s / 550 steps = 9.27 s/step) would give 8,809 s left
    assert line.endswith("(37%) 2.00 s/step elapsed 1:25:00 ETA 0:31:40")  # 950 steps x 2 s


def test_fast_units_show_as_a_rate_per_second_and_nothing_is_timed_before_the_first_unit():
    from llava_core.progress import RateWindow, progress_text

    window = RateWindow(10, 100.0, 0)
    assert progress_text("prepare align", "row", 0, 5000, window, 5.0) == (
        "[prepare align] row 0/5000 (0%) -- rows/s elapsed 0:00:05 ETA --")
    window.add(130.0, 1200)
    assert progress_text("prepare align", "row", 1200, 5000, window, 35.0) == (
        "[prepare align] row 1200/5000 (24%) 40.0 rows/s elapsed 0:00:35 ETA 0:01:35")


def test_row_progress_reports_every_interval_and_at_the_last_row_with_the_recent_rate():
    from llava_core.progress import RowProgress

    progress = RowProgress("evaluate", "prompt", 1000, now=0.0, every_s=30.0)
    assert progress.report(10, 29.0) is None  # not yet half a minute
    assert progress.report(300, 30.0) == "[evaluate] prompt 300/1000 (30%) 10.0 prompts/s elapsed 0:00:30 ETA 0:01:10"
    assert progress.report(310, 31.0) is None
    # the window holds the start and both reports (fewer than REPORT_WINDOW): 500 in 90 s, so 90 s for the last 500
    assert progress.report(500, 90.0) == "[evaluate] prompt 500/1000 (50%) 5.6 prompts/s elapsed 0:01:30 ETA 0:01:30"
    assert progress.report(1000, 95.0).startswith("[evaluate] prompt 1000/1000 (100%) ")  # the last one, at once
