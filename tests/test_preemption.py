"""Real processes: SIGTERM saves and exits cleanly; SIGKILL at any moment leaves a
resumable run (the last complete checkpoint), through the CLI."""

import os
import signal
import subprocess
import sys
import time

from t5x_like import checkpoints, main
from t5x_like.metrics_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(model_dir, steps):
    return [
        "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
        f"--gin.MODEL_DIR={model_dir}",
        "--gin.MIXTURE_OR_TASK_NAME=shakespeare_span_corruption_byte",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}",
        f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.NUM_EMBEDDINGS=384",
        "--gin.VOCABULARY_NAME=byte", "--gin.USE_PACKING=False",
        "--gin.train.train.checkpoint_every=2", "--gin.train.train.log_every=1",
        "--gin.train.train.eval_every=0",
    ]


def _start(model_dir, steps):
    return subprocess.Popen(
        [sys.executable, "-m", "t5x_like.main", *_args(model_dir, steps)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for_step(proc, model_dir, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            steps = [r["step"] for r in read_metrics(model_dir) if r["split"] == "train"]
        except (FileNotFoundError, ValueError):
            steps = []
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    proc = _start(tmp_path, 100_000)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last_logged = max(r["step"] for r in read_metrics(tmp_path) if r["split"] == "train")
    steps = checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps()
    assert steps[-1] == last_logged  # saved where it stopped, not only at the cadence
    assert last_logged < 100_000


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tmp_path, clean_gin):
    proc = _start(tmp_path, 100_000)
    _wait_for_step(proc, tmp_path, 5)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: whatever was on disk stays
    proc.communicate(timeout=60)
    complete = checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps()
    assert complete, "at least one checkpoint (every 2 steps) completed before the kill"
    resume_from = complete[-1]
    logged_before = len(read_metrics(tmp_path))
    assert max(r["step"] for r in read_metrics(tmp_path)) >= resume_from
    main.main(_args(tmp_path, resume_from + 2))  # the same command, resumed
    resumed = [r["step"] for r in read_metrics(tmp_path)[logged_before:] if r["split"] == "train"]
    assert resumed == [resume_from + 1, resume_from + 2]
    assert checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == resume_from + 2
