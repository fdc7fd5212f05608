import json

from ftcluster import records
from ftcluster.records import Line, Summary, WorkerRecord


def _worker(rank, **kw):
    base = dict(rank=rank, world_size=2, total_steps=10, step=4, epoch=0, first_step_unix=100.0 + rank,
                loss=2.5, lr=1e-4, grad_norm=0.75, step_time_s=0.5, tokens_per_s=1000.0 + rank,
                tokens_per_s_total=2001.0, mfu=0.4, peak_allocated_gib=3.0 + rank, pid=10 + rank)
    return WorkerRecord(**{**base, **kw})


def test_a_line_is_rank_0s_record_with_every_workers_figures_and_round_trips(tmp_path):
    line = Line.of_workers([_worker(1, checkpoint="/ckpt/step4"), _worker(0, checkpoint="/ckpt/step4")])
    assert line.rank == 0 and line.checkpoint == "/ckpt/step4" and line.peak_allocated_gib_per_worker == [3.0, 4.0] and line.pid_per_worker == [10, 11]
    assert line.largest("peak_allocated_gib") == 4.0 and line.peak_reserved_gib_per_worker is None
    records.append_line(tmp_path, line)
    records.append_line(tmp_path, Line.of_workers([_worker(0, step=5, loss=None), _worker(1, step=5, loss=None)]))
    back = records.read_lines(tmp_path)
    assert back[0] == line and back[1].step == 5 and not back[1].logged
    assert "loss" not in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])  # None is left out


def test_the_progress_line_renders_a_line():
    text = records.progress_line(Line.of_workers([_worker(0, eval_loss=2.0, eval_perplexity=7.39)]))
    assert text.startswith("[############") and "step 4/10" in text and "loss 2.5000" in text
    assert "grad norm 0.75" in text and "2,001 tok/s" in text and "MFU 40.0%" in text and "ppl 7.39" in text
    stopped = records.progress_line(Line.of_workers([_worker(0, loss=None, stopped="SIGTERM", checkpoint="/ckpt")]))
    assert "stopped early (SIGTERM), checkpoint saved" in stopped and "loss" not in stopped


def test_the_summary_takes_medians_after_the_first_window_and_peaks_over_workers(tmp_path):
    lines = [Line.of_workers([_worker(0, step=s, tokens_per_s_total=t, peak_allocated_gib=p), _worker(1, step=s)])
             for s, t, p in ((2, 10.0, 9.0), (4, 2000.0, 3.0), (6, 2200.0, 3.0), (8, 2100.0, 3.0))]
    s = Summary.of_lines(lines, tmp_path, "lora", 12.34, 90.0, checkpoint=None)
    assert s.tokens_per_s_total == 2100.0 and s.final_step == 8 and s.wall_time_s == 12.3
    assert s.peak_allocated_gib == 9.0 and s.time_to_first_step_s == 10.0 and s.losses[0] == [2, 2.5]
    s.write(tmp_path)
    assert Summary.read(tmp_path) == s and json.loads((tmp_path / "summary.json").read_text())["final_model"] is None
    # Two steady windows: their mean, not the better one.
    assert Summary.of_lines(lines[:3], tmp_path, "lora", 12.34, 90.0, checkpoint=None).tokens_per_s_total == 2100.0


def test_time_to_first_step_is_this_attempts_and_is_split_by_phase(tmp_path):
    setup = {"data": 4.0, "model": 6.0, "engine": 2.0}
    earlier = Line.of_workers([_worker(0, step=2, first_step_unix=50.0, setup_started_unix=30.0, setup_s=setup)])
    lines = [earlier] + [Line.of_workers([_worker(0, step=s, first_step_unix=125.0, setup_started_unix=105.0,
                                                  setup_s=setup)]) for s in (4, 6)]
    # The command started at 88 s and spent 2 s importing before the driver's checks began at 90 s.
    driver = {"imports": 2.0, "checks": 3.0, "cluster": 7.0, "ready_unix": 100.0}
    s = Summary.of_lines(lines, tmp_path, "lora", 40.0, 88.0, driver, checkpoint=None)
    assert s.time_to_first_step_s == 37.0  # the resumed attempt's first step, not the earlier attempt's
    assert s.first_step_phases_s == {"imports": 2.0, "checks": 3.0, "cluster": 7.0, "workers start": 5.0, "data": 4.0,
                                     "model": 6.0, "engine": 2.0, "first step": 8.0}
    assert sum(s.first_step_phases_s.values()) == s.time_to_first_step_s


def test_steps_trained_again_after_a_resume_replace_the_earlier_attempts_lines(tmp_path, capsys):
    from ftcluster.progress import ProgressLog

    first = ProgressLog(tmp_path, started_unix=0.0)
    for step in range(1, 6):
        first.log([_worker(0, step=step, loss=10.0 + step, pid=1, world_size=1).to_json()])
    # The attempt died after step 5; the next resumed from its checkpoint at step 3, in a new driver.
    second = ProgressLog(tmp_path, started_unix=0.0)
    for step in range(4, 8):
        second.log([_worker(0, step=step, loss=20.0 + step, pid=2, world_size=1).to_json()])
    kept = records.read_lines(tmp_path)
    assert [(l.step, l.pid) for l in kept] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2), (7, 2)]
    assert Summary.of_lines(kept, tmp_path, "lora", 1.0, 0.0).losses == [[s, l.loss] for s, l in
                                                                          zip(range(1, 8), kept)]
    every = records.read_lines(tmp_path, superseded=True)
    assert [(l.step, l.pid) for l in every] == [(s, 1) for s in range(1, 6)] + [(s, 2) for s in range(4, 8)]
    assert [json.loads(t)["step"] for t in (tmp_path / records.SUPERSEDED).read_text().splitlines()] == [4, 5]
