"""train.signals: the first SIGINT/SIGTERM is noted, the second acts at once; the timed-checkpoint clock;
the interrupt line and the resume command."""

import os
import signal
import time
from pathlib import Path

import pytest

from tunesmith.train.signals import (
    SaveClock,
    StopSignals,
    TrainingInterrupted,
    interrupt_line,
    resume_command,
    sigterm_interrupts,
)


def test_first_sigint_is_noted_and_the_second_interrupts_at_once():
    # Python's own handler, as the CLI has it (a library imported by an earlier test may have swapped it)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.requested == signal.SIGINT  # noted, nothing raised: the step finishes
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)


def test_sigterm_is_noted_then_the_command_handler_is_back():
    before = signal.getsignal(signal.SIGTERM)
    try:
        sigterm_interrupts()
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert stop.requested == signal.SIGTERM
            with pytest.raises(TrainingInterrupted) as second:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        assert second.value.exit_code == 143 and second.value.checkpoint is None
    finally:
        signal.signal(signal.SIGTERM, before)


def test_disabled_stop_signals_leave_handlers_alone():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(enabled=False):
        assert signal.getsignal(signal.SIGINT) is before


def test_save_clock():
    assert not SaveClock(0).due()
    clock = SaveClock(1 / 60_000)  # one millisecond
    time.sleep(0.01)
    assert clock.due()
    assert clock.saved(Path("x")) == Path("x") and not SaveClock(10).due()


def test_interrupt_line_and_resume_command():
    cmd = resume_command("train", ["my run.yaml", "train.lr=1e-4"])
    assert cmd == "tunesmith train 'my run.yaml' train.lr=1e-4 --resume"
    assert resume_command("train", ["c.yaml", "--resume"]) == "tunesmith train c.yaml --resume"
    ckpt = Path("out/run/checkpoints/step-00000012")
    assert interrupt_line("SIGTERM", ckpt, cmd, True) == (
        f"tunesmith: interrupted (SIGTERM); checkpoint saved at step 12 ({ckpt}); resume: {cmd}"
    )
    assert "no new checkpoint; the newest is at step 12" in interrupt_line("SIGINT", ckpt, cmd, False)
    assert interrupt_line("SIGINT", None, cmd, False) == (
        "tunesmith: interrupted (SIGINT); no checkpoint exists, so running it again starts from step 0"
    )
