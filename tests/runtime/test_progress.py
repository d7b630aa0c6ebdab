"""Progress lines: one whole line per update in a log, one redrawn line on a terminal,
nothing for short work, nothing from processes other than the first."""

from __future__ import annotations

import io

from mocov3.runtime import progress as progress_module
from mocov3.runtime.progress import Progress, _duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_whole_line_per_update_and_a_last_one():
    log = io.StringIO()
    with Progress("features", total=10, stream=log, interval=0.0, delay=0.0) as bar:
        for _ in range(5):
            bar.update(2)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 5  # one per update; the last showed the end, so closing adds none
    assert lines[0].startswith("features: 2/10 img (20%)")
    assert lines[-1].startswith("features: 10/10 img (100%)")
    assert all("img/s" in line and "eta" in line and "elapsed" in line for line in lines)


def test_a_terminal_line_is_redrawn_in_place():
    tty = Terminal()
    with Progress("embed", total=4, stream=tty, interval=0.0, delay=0.0) as bar:
        bar.update(1)
        bar.update(3)
    text = tty.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_short_work_prints_nothing_and_other_processes_never_print(monkeypatch):
    quiet = io.StringIO()
    with Progress("quick", total=3, stream=quiet, interval=0.0, delay=3600.0) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    monkeypatch.setattr(progress_module, "is_main_process", lambda: False)
    other = io.StringIO()
    with Progress("rank 1", total=3, stream=other, interval=0.0, delay=0.0) as bar:
        bar.update(3)
    assert other.getvalue() == ""


def test_updates_count_every_process_share_and_lines_are_throttled():
    log = io.StringIO()
    bar = Progress("knn", total=100, stream=log, interval=3600.0, delay=0.0, processes=4)
    bar.update(5)  # this process's 5 stand for the 4 processes' 20
    bar.update(5)  # within the interval: counted, not shown
    assert bar.done == 40 and len(log.getvalue().splitlines()) == 1
    assert "20/100" in log.getvalue()
    bar.close()  # the end was not shown yet: closing shows it
    assert log.getvalue().splitlines()[-1].startswith("knn: 100/100 img (100%)")


def test_durations_read_as_clock_times():
    assert _duration(5) == "00:05" and _duration(125) == "02:05" and _duration(3725) == "1:02:05"
