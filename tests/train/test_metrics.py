"""The console line's smoothed rate and ETA, and wandb started lazily and quietly."""

import json

import pytest

from xlstm_train.train import metrics
from xlstm_train.train.metrics import (
    SMOOTHING_INTERVALS, MetricsLogger, Throughput, format_duration, format_train_line,
)


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3599, "59m59s"),
                                           (3600 * 3 + 7 * 60 + 20, "3h07m"), (86400 * 2 + 3600 * 4, "2d04h")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_smoothed_rate_and_eta_follow_the_recent_intervals(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    throughput = Throughput(total_steps=1000)  # resumed at step 200: the first record sets the baselines
    tokens_per_step, step, tokens_seen = 512, 200, 200 * 512
    intervals = []  # (tokens/s of the interval, wall seconds per step)
    for n in range(25):
        rate = 1000.0 if n % 2 else 50.0  # a busy machine: every other interval is 20x slower
        wall_per_step = tokens_per_step / rate + 0.1  # plus evaluation and checkpoint time
        step += 10
        tokens_seen += 10 * tokens_per_step
        clock[0] += 10 * wall_per_step
        fields = throughput.update({"step": step, "tokens_seen": tokens_seen, "tokens_per_s": rate})
        intervals.append((rate, wall_per_step))
        assert fields["elapsed_s"] == pytest.approx(clock[0] - 100.0)
        if n == 0:
            assert fields["tokens_per_s_avg"] is None and fields["eta_s"] is None
            continue
        recent = intervals[1:][-SMOOTHING_INTERVALS:]
        assert fields["eta_s"] == pytest.approx((1000 - step) * sum(w for _, w in recent) / len(recent))
        measured = [r for r, _ in recent]
        want = len(measured) * 10 * tokens_per_step / sum(10 * tokens_per_step / r for r in measured)
        assert fields["tokens_per_s_avg"] == pytest.approx(want)
    assert 50.0 < fields["tokens_per_s_avg"] < 1000.0

    line = format_train_line({"step": step, "loss": 2.0, "ppl": 7.4, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
                              "memory_gib": 1.0, **fields}, 1000)
    assert f"{metrics._si(fields['tokens_per_s_avg'])} tok/s (now 1.0k)" in line
    assert line.endswith(f"{format_duration(fields['elapsed_s'])} eta {format_duration(fields['eta_s'])}")


def _record(step):
    return {"step": step, "loss": 2.0, "ppl": 7.4, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0,
            "memory_gib": 1.0, "tokens_seen": 64 * step, "mfu": None, "skipped_steps": 0}


def test_wandb_starts_on_the_first_record_quietly_with_its_group(tmp_path, capfd):
    def logger(run_dir, wandb_id=None):
        run_dir.mkdir()
        return MetricsLogger(run_dir, total_steps=4, wandb_mode="offline", wandb_project="p", wandb_entity=None,
                             run_name="r", config={"a": 1}, wandb_id=wandb_id, wandb_group="sweep-a")

    idle = logger(tmp_path / "idle", wandb_id="abcd1234")  # a rerun of a finished run logs events only
    idle.log_event("resume", step=4)
    assert idle.wandb_id == "abcd1234"
    idle.close()
    assert not (tmp_path / "idle" / "wandb").exists()

    active = logger(tmp_path / "active")
    wandb_id = active.wandb_id
    assert len(wandb_id) == 8 and wandb_id.isalnum()
    active.log_train(_record(2))
    assert active._wandb_run.group == "sweep-a" and active._wandb_run.id == wandb_id
    active.log_val({"step": 4, "val_loss": 2.0, "val_ppl": 7.4})
    active.close()
    active.close()  # idempotent
    runs = list((tmp_path / "active" / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(runs) == 1
    out = capfd.readouterr()
    assert "Run history" not in out.out + out.err and "Run summary" not in out.out + out.err
    records = [json.loads(line) for line in (tmp_path / "active" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "val"] and "eta_s" in records[0]
