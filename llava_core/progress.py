"""Progress lines of the long stages (train, prepare, evaluate): done of total with %, the rate, elapsed and an ETA,
in one format. Pure functions of explicit times, so tests drive them with a fake clock."""
from __future__ import annotations

from collections import deque

DAY = 24 * 3600


def duration(seconds: float) -> str:
    """`H:MM:SS` under a day, `Nd HH:MM:SS` from a day on: never wraps (a clock format shows 50 h as `02:00:00`)."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, DAY)
    clock = f"{rest // 3600}:{rest // 60 % 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock:0>8}" if days else clock


class RateWindow:
    """The rate over the last `size` updates: `(time, done)` points, the oldest dropped. A recent
    window follows a rate change (more workers after a resume, a slower data mix) where the mean since the start
    would lag for hours; with fewer points than `size` it uses what exists. The first point is where this attempt
    starts counting (a resume's skipped units and the start-up before it are never in the rate)."""

    def __init__(self, size: int, now: float, done: int):
        self.points = deque([(now, done)], maxlen=size + 1)  # size intervals between size + 1 points

    def add(self, now: float, done: int) -> None:
        self.points.append((now, done))

    def seconds_per_unit(self) -> float | None:
        (t0, first), (t1, last) = self.points[0], self.points[-1]
        return (t1 - t0) / (last - first) if last > first else None


def rate_text(seconds_per_unit: float | None, unit: str) -> str:
    """Slow units as seconds each (`2.10 s/step`), fast ones as a rate (`85.3 rows/s`); `--` before any is timed."""
    if not seconds_per_unit:
        return f"-- {unit}s/s"
    if seconds_per_unit >= 1:
        return f"{seconds_per_unit:.2f} s/{unit}"
    return f"{1 / seconds_per_unit:.1f} {unit}s/s"


def progress_text(label: str, unit: str, done: int, total: int, window: RateWindow, elapsed: float) -> str:
    """`[label] unit done/total (pct%) rate elapsed H:MM:SS ETA H:MM:SS`: the ETA is the window's rate times what is
    left (`--` until a unit is timed)."""
    per_unit = window.seconds_per_unit()
    eta = "--" if per_unit is None else duration(per_unit * max(total - done, 0))
    percent = done / total if total else 1.0
    return (f"[{label}] {unit} {done}/{total} ({percent:.0%}) {rate_text(per_unit, unit)} "
            f"elapsed {duration(elapsed)} ETA {eta}")


REPORT_EVERY_S = 30.0  # one line per half minute: a long prepare or evaluate shows it moves, a short one stays quiet
# The ETA of rows follows the last REPORT_WINDOW reports (5 minutes at one each REPORT_EVERY_S): rows come in bursts
# of a batch per actor, which one report's interval alone would show as a rate jumping by the actor count.
REPORT_WINDOW = 10


class RowProgress:
    """Progress through a known number of rows (prepare's rows, evaluate's prompts), counted by the caller as the
    work completes: `report` gives a line every `every_s` seconds and one when the last row is done."""

    def __init__(self, label: str, unit: str, total: int, now: float, every_s: float = REPORT_EVERY_S):
        self.label, self.unit, self.total, self.every_s = label, unit, total, every_s
        self.start = self.last_report = now
        self.window = RateWindow(REPORT_WINDOW, now, 0)

    def report(self, done: int, now: float) -> str | None:
        if done < self.total and now - self.last_report < self.every_s:
            return None
        self.last_report = now
        self.window.add(now, done)
        return progress_text(self.label, self.unit, done, self.total, self.window, now - self.start)
