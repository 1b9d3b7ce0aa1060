"""Run outputs (jaxmoe.metrics): metrics.jsonl, TensorBoard event files through tensorboardX,
and the progress bar."""

import glob
import io
import os
import struct

import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from jaxmoe.metrics import MetricsLogger, ProgressBar, TensorBoardWriter, read_jsonl


def _event_file_records(path: str) -> list[bytes]:
  """The records of a TFRecord-framed event file, each length and payload checked against its
  masked CRC32C (the framing TensorBoard's reader checks)."""
  raw = open(path, "rb").read()
  records, pos = [], 0
  while pos < len(raw):
    (n,) = struct.unpack_from("<Q", raw, pos)
    assert struct.unpack_from("<I", raw, pos + 8)[0] == masked_crc32c(raw[pos:pos + 8])
    data = raw[pos + 12:pos + 12 + n]
    assert struct.unpack_from("<I", raw, pos + 12 + n)[0] == masked_crc32c(data)
    records.append(data)
    pos += 16 + n
  return records


def test_tensorboard_event_file(tmp_path):
  """The event file: CRC32C test vector, TFRecord framing and the scalar events, read back with
  the Event protobuf; non-finite values are left out."""
  assert crc32c(b"123456789") == 0xE3069283     # the standard CRC-32C check value
  writer = TensorBoardWriter(str(tmp_path))
  writer.scalars(7, {"loss": 2.5, "skipped": float("nan")})
  writer.close()
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  records = _event_file_records(path)
  assert len(records) == 2 and Event.FromString(records[0]).file_version == "brain.Event:2"
  event = Event.FromString(records[1])
  assert event.step == 7
  assert [(v.tag, v.simple_value) for v in event.summary.value] == [("loss", 2.5)]


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
  """MetricsLogger: every record in metrics.jsonl, its numeric fields (not step) as scalars."""
  logger = MetricsLogger(str(tmp_path))
  logger.log({"step": 1, "loss": 3.0, "phase": "train"})
  logger.log({"step": 2, "loss": 2.0, "lr": 0.1})
  logger.close()
  assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [
      {"step": 1, "loss": 3.0, "phase": "train"}, {"step": 2, "loss": 2.0, "lr": 0.1}]
  (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  scalars = sorted((e.step, v.tag, v.simple_value)
                   for e in map(Event.FromString, _event_file_records(path)[1:])
                   for v in e.summary.value)
  assert scalars == [(1, "loss", 3.0), (2, "loss", 2.0), (2, "lr", pytest.approx(0.1))]


def test_resume_drops_later_records_and_purges_tensorboard(tmp_path):
  """A run killed at step 6 after its step-4 checkpoint resumes from 4: metrics.jsonl keeps steps
  1-4 (rewritten whole, the torn line gone) so every step appears once, in order; TensorBoard's
  new event file starts with the session-start event at step 5 that hides the older events of
  steps >= 5."""
  old = MetricsLogger(str(tmp_path))
  for step in range(1, 7):
    old.log({"step": step, "loss": 10.0 - step})
  old.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "lo')    # torn by the kill
  for name in glob.glob(str(tmp_path / "tb" / "*")):   # one event file per process
    os.rename(name, name + ".old")
  logger = MetricsLogger(str(tmp_path), resume_step=4)
  logger.log({"step": 5, "loss": 1.0})
  logger.close()
  assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4, 5]
  assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
  (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*[0-9]"))
  events = [Event.FromString(r) for r in _event_file_records(path)]
  starts = [e.step for e in events if e.HasField("session_log")]
  assert starts == [5] and events[-1].summary.value[0].simple_value == 1.0


def test_fresh_run_over_an_unfinished_one_starts_the_metrics_anew(tmp_path):
  """No checkpoint (killed before its first): resume_step 0 drops every old record; a folder
  without metrics gets no purge event."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
  MetricsLogger(str(tmp_path), tensorboard=False, resume_step=0).close()
  assert read_jsonl(str(tmp_path / "metrics.jsonl")) == []
  MetricsLogger(str(tmp_path / "new"), resume_step=0).close()
  (path,) = glob.glob(str(tmp_path / "new" / "tb" / "events.out.tfevents.*"))
  assert not any(Event.FromString(r).HasField("session_log") for r in _event_file_records(path))


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bar(tty):
  """One plain line per update in a log; the rich bar on a terminal; both show step/total and loss."""
  stream = _Terminal() if tty else io.StringIO()
  bar = ProgressBar(10, start=2, stream=stream)
  bar.update(3, 2.5, 12345.0)
  bar.update(4, 2.25, 12345.0)
  bar.close()
  out = stream.getvalue()
  assert "4/10" in out and "2.2500" in out and "12.3k tok/s" in out
  if not tty:
    assert out.splitlines()[0].startswith("3/10 loss 2.5000 | 12.3k tok/s | ETA ")
    assert len(out.splitlines()) == 2
