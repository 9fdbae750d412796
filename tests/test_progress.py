"""Progress and logs: step i of n with elapsed time and an estimate; bars on a terminal, a line at most once a
minute elsewhere; FAISS's loader messages kept from the user."""

import io
import subprocess
import sys

from misbench.cli.common import Progress, StagedProgress
from misbench.cli.study import StepClock


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_off_a_terminal_writes_a_line_at_most_once_a_minute():
    clock, stream = FakeClock(), io.StringIO()  # StringIO is no TTY, like a Slurm log
    bar = Progress("extract", "img", stream=stream, clock=clock)
    for done in range(0, 1001):
        clock.now = done * 0.25  # 1000 callbacks over 250 s
        bar(done, 1000)
    bar.close()
    lines = stream.getvalue().splitlines()
    # brute force: the times a line was due, one every >= 60 s after the first callback (none at the start,
    # so that short commands print nothing)
    due, last = [], 0.0
    for done in range(0, 1001):
        t = done * 0.25
        if t - last >= 60:
            due.append(done)
            last = t
    assert len(lines) == len(due) == 4
    assert [int(line.split(": ")[1].split("/")[0]) for line in lines] == due
    assert lines[-1] == "extract: 960/1000 img (96%), elapsed 0:04:00"


def test_staged_progress_keeps_one_bar_per_stage():
    clock, stream = FakeClock(), io.StringIO()
    stages = StagedProgress({"embed": "img", "score": "unit"}, stream=stream, clock=clock)
    stages("embed base", 0, 10)
    stages("score base", 0, 4)
    clock.now = 30
    stages("embed base", 5, 10)  # within the minute: no line
    clock.now = 61
    stages("embed base", 6, 10)
    stages("score base", 2, 4)
    assert stream.getvalue().splitlines() == ["embed base: 6/10 img (60%), elapsed 0:01:01",
                                              "score base: 2/4 unit (50%), elapsed 0:01:01"]


def test_step_clock_says_step_i_of_n_with_elapsed_and_estimate():
    clock, lines = FakeClock(), []
    steps = StepClock(clock=clock, echo=lines.append)
    steps("train:base", "cached", 1, 5)
    clock.now = 10
    steps("eval:base", "run", 2, 5)
    clock.now = 40  # eval took 30 s: 3 steps to come (this one included) at 30 s
    steps("extract:base", "run", 3, 5)
    clock.now = 100  # extract took 60 s: mean 45 s, 2 steps to come
    steps("score:base", "resume", 4, 5)
    assert lines == ["[step 1/5] cached train:base, elapsed 0:00:00",
                     "[step 2/5] running eval:base, elapsed 0:00:10, estimate after the first step",
                     "[step 3/5] running extract:base, elapsed 0:00:40, about 0:01:30 left",
                     "[step 4/5] resuming score:base, elapsed 0:01:40, about 0:01:30 left"]


def test_faiss_loader_messages_do_not_reach_the_user():
    code = "from misbench.cli.main import setup_logging; setup_logging({v}, False); import faiss, logging; " \
           "logging.getLogger('misbench').info('library info still shows')"
    quiet = subprocess.run([sys.executable, "-c", code.format(v=0)], capture_output=True, text=True, check=True)
    assert "faiss" not in quiet.stderr.lower() and "library info still shows" in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code.format(v=2)], capture_output=True, text=True, check=True)
    assert "faiss.loader" in loud.stderr  # the messages exist: -vv shows them
