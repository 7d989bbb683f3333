"""Step metrics to JSONL + TensorBoard (process 0 only) and a console progress bar.

Both files are written in the calling thread, so a failed write (a full disk, a dead mount) stops the loop at once
as a storage.WriteError; tensorboardX's own writer does it in a thread that can die and leave the caller blocked on
its queue. On resume both drop what came after the restored step, so every step is in them once.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import struct
import time

import tqdm

from zenjax import storage

log = logging.getLogger(__name__)

KEY_FIGURES = ("reward_mean", "eval_reward", "clip_frac_low", "clip_frac_high", "completion_len_mean", "tok_per_s")


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._bar = None
        if enabled:
            self._total, self._start = total_steps, start_step
            with storage.writing(self.path):
                self._drop_after(start_step)
            self._tb = EventFile(os.path.join(workdir, "tb"), start_step)

    def _drop_after(self, step: int) -> None:
        """On resume, forget lines past the restored step (and a line torn by a kill) so the file holds each
        step once; damaged lines are set aside next to it. The rewrite is atomic."""
        if not os.path.exists(self.path):
            return
        rows, damaged = _parse(self.path)
        if damaged:
            aside = f"{self.path}.damaged-{int(time.time())}"
            _write_atomically(aside, "".join(line for _, line in damaged))
            log.warning("%s: line(s) %s are damaged; set aside in %s (the rows after step %d are written again)",
                        self.path, ", ".join(str(i) for i, _ in damaged), aside, step)
        _write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in rows if row.get("step", 0) <= step))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or hasattr(v, "item")}
        with storage.writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        self._tb.write(step, {k: v for k, v in clean.items() if math.isfinite(v)})
        if self._bar is None:  # from the first step on, so start-up and warm-up do not skew its ETA
            self._bar = tqdm.tqdm(total=self._total, initial=self._start, desc="gspo", dynamic_ncols=True)
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{clean[k]:.3g}" for k in KEY_FIGURES if k in clean}, refresh=False)

    def log(self, message: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(message)

    def close(self) -> None:
        if self.enabled and self._bar is not None:
            self._bar.close()


class EventFile:
    """TensorBoard scalars in `<directory>/events.out.tfevents.*`, appended (and closed) once per step. Opening it
    keeps the events up to `step` of the files already there, in one new file that replaces them."""

    def __init__(self, directory: str, step: int):
        from tensorboardX.proto import event_pb2, summary_pb2  # noqa: PLC0415 - protobuf, main process only

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        old = sorted(glob.glob(os.path.join(directory, "*tfevents*")))
        events = [self._event.FromString(data) for path in old for data in _records(path)]
        kept = [e.SerializeToString() for e in events if e.HasField("summary") and e.step <= step]
        self.path = os.path.join(directory, f"events.out.tfevents.{time.time():.0f}.zenjax")
        with storage.writing(directory):
            os.makedirs(directory, exist_ok=True)
            header = self._event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
            _write_atomically(self.path, b"".join(map(_record, [header, *kept])))
            for path in old:
                if path != self.path:
                    os.remove(path)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
        data = self._event(wall_time=time.time(), step=step, summary=summary).SerializeToString()
        with storage.writing(self.path), open(self.path, "ab") as f:
            f.write(_record(data))


def _masked_crc(data: bytes) -> int:
    from tensorboardX.record_writer import masked_crc32c  # noqa: PLC0415

    return masked_crc32c(data)


def _record(data: bytes) -> bytes:
    """TFRecord framing: length, its CRC, the data, its CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _records(path: str) -> list[bytes]:
    """The event records of a file up to the first one cut short (by a kill) or damaged (with a warning)."""
    with open(path, "rb") as f:
        buf = f.read()
    out, pos = [], 0
    while pos + 12 <= len(buf):
        (n,) = struct.unpack_from("<Q", buf, pos)
        end = pos + 12 + n + 4
        if end > len(buf):
            break
        if struct.unpack_from("<I", buf, end - 4)[0] != _masked_crc(buf[pos + 12:end - 4]):
            log.warning("%s: a damaged event at byte %d and the ones after it are dropped", path, pos)
            break
        out.append(buf[pos + 12:end - 4])
        pos = end
    return out


def _write_atomically(path: str, content: str | bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse(path: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """(the rows, the damaged lines with their 1-based numbers); a last line that a kill cut short is dropped."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows, damaged = [], []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
            rows.append(row)
        except ValueError:
            if i < len(lines) - 1 or line.endswith("\n"):
                damaged.append((i + 1, line if line.endswith("\n") else line + "\n"))
    return rows, damaged


def read(workdir: str) -> list[dict]:
    """The rows of a run's metrics.jsonl; a damaged line (other than a last one cut short) is an error."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows, damaged = _parse(path)
    if damaged:
        raise ValueError(f"{path}: line {damaged[0][0]} is not JSON")
    return rows
