"""The progress bar (tqdm underneath): silent when disabled, whole lines in logs, metrics."""

import io

from optax_localsgd.util.progress import Progress


def test_a_log_gets_whole_lines_with_the_metrics_and_the_final_count():
  log = io.StringIO()  # not a terminal, like a batch job's log file
  bar = Progress(6, desc="slowmo", stream=log, min_interval_s=0)
  for _ in range(3):
    bar.update(2, local_loss=0.123456)
  bar.write("a note")
  bar.close()
  lines = log.getvalue().splitlines()
  assert "\r" not in log.getvalue() and all(line.strip() for line in lines)
  assert lines[0].startswith("slowmo:") and "0/6" in lines[0]
  assert "6/6" in lines[-2] and "local_loss=0.1235" in lines[-2] and "rounds/s" in lines[-2]
  assert lines[-1] == "a note"  # the final count is not printed twice


def test_a_slow_log_still_ends_with_the_final_count():
  log = io.StringIO()
  bar = Progress(10, stream=log, unit="steps", initial=4, min_interval_s=3600)
  bar.update(6, meta_loss=2.0)
  bar.close()
  first, last = log.getvalue().splitlines()
  assert "4/10" in first and "10/10" in last and "meta_loss=2" in last


def test_disabled_prints_nothing():
  log = io.StringIO()
  bar = Progress(5, stream=log, enabled=False)
  bar.update(5, local_loss=1.0)
  bar.write("a note")
  bar.close()
  assert log.getvalue() == ""
