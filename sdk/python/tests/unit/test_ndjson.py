"""The NDJSON output stream: lines split anywhere across chunks, base64 records, exits."""

from __future__ import annotations

import base64
import json

import pytest

from ember_sandbox import EmberConnectionError, EmberError, LogLine
from ember_sandbox._core import ExecState, NdjsonDecoder, record_bytes

STREAM = b"".join(
    json.dumps(r).encode() + b"\n"
    for r in [
        {"type": "started", "cmd_id": "cmd-1", "pid": 7},
        {"type": "stdout", "data": "héllo\n"},
        {"type": "stderr", "data_base64": base64.b64encode(b"\xff\xfe").decode()},
        {"type": "stdout", "data": "wörld €\n", "data_base64": None},
        {"type": "exit", "exit_code": 3, "signal": None, "timed_out": False, "duration_ms": 2.5},
    ]
)


def run(chunks: list[bytes]) -> ExecState:
    state = ExecState()
    decoder = NdjsonDecoder()
    for chunk in chunks:
        for record in decoder.feed(chunk):
            state.feed(record)
    for record in decoder.close():
        state.feed(record)
    return state


def check(state: ExecState) -> None:
    assert state.cmd_id == "cmd-1" and state.pid == 7
    assert state.output.bytes_of("stdout") == "héllo\nwörld €\n".encode()
    assert state.output.bytes_of("stderr") == b"\xff\xfe"
    assert [line.stream for line in state.output] == ["stdout", "stderr", "stdout"]
    status = state.require_exit()
    assert status.exit_code == 3 and status.signal is None and not status.timed_out
    assert status.duration_ms == 2.5


def test_whole_stream_at_once() -> None:
    check(run([STREAM]))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 61])
def test_lines_split_across_chunks_anywhere(size: int) -> None:
    check(run([STREAM[i : i + size] for i in range(0, len(STREAM), size)]))


def test_every_single_split_point() -> None:
    for cut in range(1, len(STREAM)):
        check(run([STREAM[:cut], STREAM[cut:]]))


def test_a_last_line_without_newline_and_blank_lines() -> None:
    check(run([STREAM[:-1]]))  # no newline after the exit record
    check(run([b"\n\n" + STREAM.replace(b"\n", b"\n\n")]))


def test_a_stream_without_exit_is_an_error() -> None:
    state = run([STREAM.rsplit(b"\n", 2)[0] + b"\n"])
    with pytest.raises(EmberConnectionError) as info:
        state.require_exit()
    assert info.value.code == "stream_incomplete"


def test_malformed_and_unknown_records() -> None:
    with pytest.raises(EmberError) as info:
        NdjsonDecoder().feed(b"{not json\n")
    assert info.value.code == "bad_stream"
    with pytest.raises(EmberError):
        NdjsonDecoder().feed(b'{"type": "surprise"}\n')
    with pytest.raises(EmberError):
        record_bytes(None, "!!not base64!!")


def test_record_bytes_and_log_lines() -> None:
    assert record_bytes("a€", None) == "a€".encode()
    assert record_bytes(None, "/w==") == b"\xff"
    assert record_bytes(None, None) == b""
    line = LogLine("stdout", b"caf\xc3\xa9 \xff")
    assert line.text == "café \ufffd"


def test_signal_and_timeout_exits() -> None:
    state = ExecState()
    state.feed({"type": "started", "cmd_id": "c"})
    state.feed({"type": "exit", "exit_code": None, "signal": 9, "timed_out": False,
                "duration_ms": 1.0})
    assert state.require_exit().signal == 9
    state.feed({"type": "exit", "timed_out": True, "duration_ms": 1.0})
    assert state.require_exit().timed_out
