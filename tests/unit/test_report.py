"""What a person reads after a run: the evaluation report (failures first, blind accuracy per category) and the plots
(titled, labelled, the loss on a log scale with a moving average, `max_length` marked)."""
import numpy as np
import pytest
from PIL import Image

from llava_core import plots
from llava_core.eval.evaluate import examples_for_report
from llava_core.eval.layouts import EvalItem
from llava_core.eval.report import render_report

CATEGORIES = ("colour", "shape", "count")


def fake_evaluation(tmp_path, wrong: set[int], n: int = 30):
    """`n` questions over three categories, the ones in `wrong` answered wrong, as the evaluate stage's rows."""
    image = tmp_path / "scene.png"
    Image.new("RGB", (32, 24), (200, 40, 40)).save(image)
    items = [EvalItem(key=str(i), question_id=str(i), text=f"What {CATEGORIES[i % 3]} is thing {i}?",
                      references=[f"answer {i}"], image_path=str(image), category=CATEGORIES[i % 3])
             for i in range(n)]
    rows = [{"question_id": str(i), "category": item.category, "question": item.text, "references": item.references,
             "prediction": f"guess {i}" if i in wrong else f"answer {i}", "correct": i not in wrong,
             "blind_prediction": "red"} for i, item in enumerate(items)]
    return items, rows


def test_the_report_shows_every_failure_first_and_blind_accuracy_per_category(tmp_path):
    wrong = {4, 11, 17, 25, 29}
    items, rows = fake_evaluation(tmp_path, wrong)
    shown = examples_for_report(items, rows, count=8)
    assert [e["question_id"] for e in shown["examples"]] == ["4", "11", "17", "25", "29", "0", "1", "2"]
    metrics = {"layout": "llava", "count": 30, "accuracy": 25 / 30,
               "by_category": {"colour": 0.9, "count": 0.8, "shape": 0.8},
               "blind": {"accuracy": 0.3333, "by_category": {"colour": 0.25, "count": 0.5, "shape": 0.125}}}
    html = render_report("run", {"main": metrics}, {"main": shown})
    for i in wrong:
        assert f"What {CATEGORIES[i % 3]} is thing {i}?" in html and f"guess {i}" in html and f"answer {i}" in html
    assert "What colour is thing 3?" not in html  # right, and past the cap
    assert "5 of 30 questions answered wrong; not shown: 0 wrong and 22 right" in html
    assert html.count('class="wrong"') == 5 and html.count('class="ok"') == 3
    table = html[html.index("<th>category</th><th>accuracy</th><th>blind accuracy</th>"):]
    for category, accuracy, blind in [("colour", "0.9000", "0.2500"), ("count", "0.8000", "0.5000"),
                                      ("shape", "0.8000", "0.1250")]:
        assert f"<td>{category}</td><td class='num'>{accuracy}</td><td class='num'>{blind}</td>" in table


def test_a_capped_report_counts_the_failures_it_leaves_out(tmp_path):
    items, rows = fake_evaluation(tmp_path, wrong=set(range(0, 30, 2)))
    shown = examples_for_report(items, rows, count=4)
    assert all(not e["correct"] for e in shown["examples"]) and (shown["wrong"], shown["right"]) == (15, 15)
    html = render_report("run", {"main": {"layout": "llava", "count": 30, "accuracy": 0.5}}, {"main": shown})
    assert "15 of 30 questions answered wrong; not shown: 11 wrong and 15 right" in html


def test_the_loss_plot_is_titled_log_scale_and_smoothed():
    steps = range(1, 201)
    noisy = [6.5 * np.exp(-s / 30) + 0.05 + 0.02 * (s % 2) for s in steps]
    history = [{"step": s, "loss": loss} for s, loss in zip(steps, noisy)]
    fig = plots.loss_figure({"align": history[:50], "instruct": history})
    align, instruct = fig.axes
    assert (align.get_title(), instruct.get_title()) == ("align: training loss", "instruct: training loss")
    assert instruct.get_yscale() == "log"
    assert instruct.get_xlabel() == "optimizer step" and instruct.get_ylabel() == "loss (log scale)"
    raw, mean = instruct.get_lines()
    assert list(raw.get_ydata()) == noisy and mean.get_label() == "mean of 10 logged"
    assert mean.get_ydata()[-1] == pytest.approx(np.mean(noisy[-10:]))
    assert plots.png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_moving_average_takes_what_it_has_at_the_start():
    assert list(plots.moving_average([2, 4, 6, 8], 2)) == [2, 3, 5, 7]


def test_the_lengths_plot_is_titled_and_marks_max_length():
    fig = plots.lengths_figure({"align": np.array([40, 60, 80]), "instruct": np.array([100, 200, 250])}, 256)
    (ax,) = fig.axes
    assert ax.get_title() == "Tokens per sample by dataset"
    assert ax.get_xlabel() == "tokens per sample (image tokens included)" and ax.get_ylabel() == "rows"
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [256, 256] and line.get_label() == "prepare.max_length = 256"
    assert plots.png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
