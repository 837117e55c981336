"""Training metrics: FLOPs counted from the model's parameters, the loss-curve PNG, TensorBoard events."""
import os

from llava_core.train.metrics import MetricsWriter, flops_counter, plot_loss_curves


def test_the_runtime_counts_flops_from_the_model_parameters(tiny_dataset):
    from llava_core.model.build import assemble_llava

    model, _ = assemble_llava(tiny_dataset["vision"], tiny_dataset["llm"])
    flops = flops_counter(model, ["projector", "llm"], lora=False)
    llm = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    llm -= model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    assert flops(tokens=100, images=0) == 6 * llm * 100
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    assert flops(tokens=100, images=2) - flops(tokens=100, images=0) == (
        6 * projector * model.config.image_seq_length * 2 + 2 * vision * patches * 2)


def test_loss_curves_png_and_tensorboard_events(tmp_path):
    history = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "grad_norm": 1.0, "mfu": None, "time": 0.0}
               for s in range(1, 6)]
    path = str(tmp_path / "loss.png")
    plot_loss_curves({"align": history, "instruct": history}, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    writer = MetricsWriter("align", {"tracking": ""}, str(tmp_path / "tb"))
    for record in history:
        writer.write(record)
    writer.close()
    events = os.listdir(tmp_path / "tb")
    assert len(events) == 1
    losses = [(e.step, v.simple_value) for e in read_events(str(tmp_path / "tb" / events[0]))
              for v in e.summary.value if v.tag == "train/loss"]
    assert [s for s, _ in losses] == list(range(1, 6))
    assert all(abs(value - 3.0 / s) < 1e-6 for s, value in losses)


def read_events(path):
    """TFRecord framing: length (8 bytes), its crc (4), the Event proto, its crc (4)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, at, out = open(path, "rb").read(), 0, []
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        out.append(Event.FromString(data[at + 12:at + 12 + length]))
        at += 12 + length + 4
    return out
