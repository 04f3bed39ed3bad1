"""The AssemblyAI double on the wire (raw websocket-client), its recogniser, faults and CLI."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websocket

from tests.double import DoubleConfig, DoubleServer
from tests.double.recognizer import GARBLED, DigitRecogniser
from tests.support.doubles import MakeDouble, double_maker
from tests.support.speech import DIGIT_WORDS, _speak_cached, compose, digits_phrase, speak
from transcriber.aai import StreamingParams, StreamingSession

KEY = "double-key"
CHUNK_BYTES = 1600                 # 50 ms at 16 kHz
ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture
def make_double() -> Iterator[MakeDouble]:
    with double_maker(KEY) as make:
        yield make


def connect(double: DoubleServer, query: str = "speech_model=u3-rt-pro",
            key: str | None = KEY, path: str = "/v3/ws") -> websocket.WebSocket:
    headers = [f"Authorization: {key}"] if key else []
    url = double.url.replace("/v3/ws", path) + (f"?{query}" if query else "")
    return websocket.create_connection(url, header=headers, timeout=5)


def read_until_close(ws: websocket.WebSocket,
                     timeout: float = 5.0) -> tuple[list[dict[str, Any]], int | None, str]:
    """Every message until the server's close frame, and that frame's code and reason."""
    messages: list[dict[str, Any]] = []
    ws.settimeout(timeout)
    try:
        while True:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                return messages, code, data[2:].decode()
            messages.append(json.loads(data))
    finally:
        ws.shutdown()


def read_for(ws: websocket.WebSocket, seconds: float) -> list[dict[str, Any]]:
    """Messages that arrive within ``seconds`` (the socket stays open)."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ws.settimeout(left)
        try:
            messages.append(json.loads(ws.recv()))
        except websocket.WebSocketTimeoutException:
            break
    return messages


def read_until(ws: websocket.WebSocket, done: Callable[[list[dict[str, Any]]], bool],
               timeout: float = 5.0) -> list[dict[str, Any]]:
    """Messages until ``done(messages)`` holds (the socket stays open)."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not done(messages):
        left = deadline - time.monotonic()
        assert left > 0, f"messages so far: {messages}"
        ws.settimeout(left)
        messages.append(json.loads(ws.recv()))
    return messages


def finals_at_least(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda messages: sum(
        1 for m in messages if m["type"] == "Turn" and m["end_of_turn"]) >= n


def first(messages: list[dict[str, Any]]) -> bool:
    return len(messages) >= 1


def send_audio(ws: websocket.WebSocket, samples: np.ndarray) -> None:
    data = np.concatenate([samples, np.zeros(-samples.size % 800, "<i2")]).tobytes()
    for offset in range(0, len(data), CHUNK_BYTES):
        ws.send_binary(data[offset:offset + CHUNK_BYTES])


def expect_error(ws: websocket.WebSocket, code: int, message_start: str) -> str:
    messages, close_code, _ = read_until_close(ws)
    errors = [m for m in messages if m.get("type") == "Error"]
    assert len(errors) == 1 and errors[0]["error_code"] == code, messages
    assert errors[0]["error"].startswith(message_start), errors[0]
    assert close_code == code
    return str(errors[0]["error"])


# -- recognition -----------------------------------------------------------------------------


def test_espeak_digit_phrases_are_recognised_exactly() -> None:
    # A renderer that bypasses speak()'s cache, as a double in another process would: sox
    # dither makes each rendering differ by a few LSB, and verification must still succeed.
    recogniser = DigitRecogniser(
        synthesise=lambda text: _speak_cached.__wrapped__(text, "en-us", 150))
    rng = random.Random(20261124)
    for _ in range(40):
        digits = [rng.randrange(10) for _ in range(rng.randint(1, 10))]
        words = recogniser.recognise(compose(0.2, digits_phrase(digits), 0.3))
        assert [w.text for w in words] == [DIGIT_WORDS[d] for d in digits]
        assert all(w.confidence > 0.9 for w in words)
        assert all(a.end_ms <= b.start_ms for a, b in itertools.pairwise(words))


def _damaged(samples: np.ndarray, how: str) -> np.ndarray:
    chunks = [samples[i:i + 800] for i in range(0, samples.size, 800)]
    middle = len(chunks) // 2
    if how == "lost":
        del chunks[middle]
    elif how == "duplicated":
        chunks.insert(middle, chunks[middle])
    else:
        chunks[middle], chunks[middle + 3] = chunks[middle + 3], chunks[middle]
    return np.concatenate(chunks)


@pytest.mark.parametrize("how", ["lost", "duplicated", "reordered"])
def test_damaged_audio_changes_the_final_text(make_double: MakeDouble, how: str) -> None:
    double = make_double()
    speech = compose(0.3, digits_phrase([4, 7, 2, 1, 9, 3]), 0.1)
    ws = connect(double)
    send_audio(ws, np.concatenate([_damaged(speech, how), np.zeros(12000, "<i2")]))
    ws.send(json.dumps({"type": "Terminate"}))
    messages, _, _ = read_until_close(ws)
    finals = [m for m in messages if m["type"] == "Turn" and m["end_of_turn"]]
    assert len(finals) == 1
    assert finals[0]["transcript"].split()[-1] == f"{GARBLED}."
    assert finals[0]["words"][0]["confidence"] < 0.9


def test_lenient_mode_keeps_the_best_guess(make_double: MakeDouble) -> None:
    double = make_double(strict_audio=False)
    speech = compose(0.3, digits_phrase([4, 7, 2, 1, 9, 3]), 0.1)
    ws = connect(double)
    send_audio(ws, np.concatenate([_damaged(speech, "lost"), np.zeros(12000, "<i2")]))
    ws.send(json.dumps({"type": "Terminate"}))
    messages, _, _ = read_until_close(ws)
    final = next(m for m in messages if m["type"] == "Turn" and m["end_of_turn"])
    assert final["transcript"] == "Four seven two one nine three."
    assert all(w["confidence"] < 0.9 for w in final["words"])


# -- turns -----------------------------------------------------------------------------------


def test_short_pause_stays_in_the_turn_long_pause_ends_it(make_double: MakeDouble) -> None:
    double = make_double()
    ws = connect(double)
    send_audio(ws, compose(0.4, digits_phrase([1, 2]), 0.3, digits_phrase([3]), 0.8,
                           digits_phrase([8, 8]), 0.8))
    messages = read_until(ws, finals_at_least(2))
    finals = [m for m in messages if m["type"] == "Turn" and m["end_of_turn"]]
    assert [m["transcript"] for m in finals] == ["One two three.", "Eight eight."]
    assert [m["turn_order"] for m in finals] == [0, 1]
    first_word = finals[0]["words"][0]
    assert 350 <= first_word["start"] <= 450                       # ms of this session's audio
    second_turn_start = finals[1]["words"][0]["start"]
    expected = (0.4 + speak(digits_phrase([1, 2])).size / 16000 + 0.3
                + speak(digits_phrase([3])).size / 16000 + 0.8) * 1000
    assert abs(second_turn_start - expected) <= 60
    started = [m for m in messages if m["type"] == "SpeechStarted"]
    assert len(started) == 2
    assert messages[0]["type"] == "Begin"
    ws.close()


def test_silence_gets_no_messages(make_double: MakeDouble) -> None:
    ws = connect(make_double())
    assert read_for(ws, 0.2)[0]["type"] == "Begin"
    send_audio(ws, np.zeros(32000, "<i2"))
    assert read_for(ws, 0.7) == []
    ws.close()


def test_universal_finalized_words_never_change(make_double: MakeDouble) -> None:
    double = make_double(mode="universal-streaming-english")
    ws = connect(double, "speech_model=universal-streaming-english&format_turns=false")
    send_audio(ws, compose(0.3, digits_phrase([5, 8, 0, 2, 7, 7, 4, 1, 6]), 0.8))
    messages = read_until(ws, finals_at_least(1))
    ws.close()
    turns = [m for m in messages if m["type"] == "Turn"]
    assert len([m for m in turns if not m["end_of_turn"]]) >= 2
    finalized: list[str] = []
    for message in turns:
        now = [w["text"] for w in message["words"] if w["word_is_final"]]
        assert now[:len(finalized)] == finalized
        finalized = now
    assert turns[-1]["end_of_turn"] and not turns[-1]["turn_is_formatted"]
    assert turns[-1]["transcript"] == "five eight zero two seven seven four one six"


def test_force_endpoint_and_terminate_flush_the_open_turn(make_double: MakeDouble) -> None:
    double = make_double()
    ws = connect(double)
    ws.send(json.dumps({"type": "ForceEndpoint"}))        # no open turn: nothing
    send_audio(ws, compose(0.3, digits_phrase([2, 0])))
    ws.send(json.dumps({"type": "ForceEndpoint"}))
    send_audio(ws, compose(0.3, digits_phrase([7])))
    ws.send(json.dumps({"type": "Terminate"}))
    messages, code, _ = read_until_close(ws)
    finals = [m["transcript"] for m in messages if m["type"] == "Turn" and m["end_of_turn"]]
    assert finals == ["Two zero.", "Seven."]
    termination = messages[-1]
    assert termination["type"] == "Termination" and code == 1000
    assert isinstance(termination["audio_duration_seconds"], int)
    assert isinstance(termination["session_duration_seconds"], int)
    record = double.wait_for_session(0, closed=True)
    assert record.received.count("ForceEndpoint") == 2 and record.terminate_received


def test_update_configuration_and_keepalive_get_no_reply(make_double: MakeDouble) -> None:
    double = make_double()
    ws = connect(double)
    read_for(ws, 0.1)
    ws.send(json.dumps({"type": "KeepAlive"}))
    ws.send(json.dumps({"type": "UpdateConfiguration", "max_turn_silence": 1200}))
    # The new silence is honoured: a 0.8 s pause no longer ends the turn.
    send_audio(ws, compose(0.3, digits_phrase([1]), 0.8, digits_phrase([4]), 1.4))
    messages = read_until(ws, finals_at_least(1))
    messages += read_for(ws, 0.3)
    finals = [m for m in messages if m["type"] == "Turn" and m["end_of_turn"]]
    assert [m["transcript"] for m in finals] == ["One four."]
    assert double.wait_for(lambda r: len(r[0].control) == 2)[0].received[:2] == \
        ("KeepAlive", "UpdateConfiguration")
    ws.close()


# -- validation and errors -------------------------------------------------------------------


INVALID = "User Input Validation Error: Invalid "


@pytest.mark.parametrize(("query", "start"), [
    ("sample_rate=16000", "'speech_model'"),
    ("speech_model=best", "'speech_model'"),
    ("speech_model=u3-rt-pro&keyterms_prompt=%5B%27a%27%2C+%27b%27%5D",   # ['a', 'b']
     "'keyterms_prompt': Value error, Invalid JSON array"),
    ("speech_model=u3-rt-pro&keyterms_prompt=a&keyterms_prompt=b", "'keyterms_prompt'"),
    ("speech_model=u3-rt-pro&format_turns=yes", "'format_turns'"),
    ("speech_model=u3-rt-pro&sample_rate=16k", "'sample_rate'"),
    ("speech_model=u3-rt-pro&encoding=mp3", "'encoding'"),
    ("speech_model=u3-rt-pro&min_turn_silence=soon", "'min_turn_silence'"),
])
def test_bad_query_parameters_are_error_3006(make_double: MakeDouble, query: str,
                                             start: str) -> None:
    double = make_double()
    expect_error(connect(double, query), 3006, INVALID + start)
    assert double.sessions() == []


def test_python_style_booleans_are_accepted(make_double: MakeDouble) -> None:
    ws = connect(make_double(), "speech_model=u3-rt-pro&format_turns=True&sample_rate=16000")
    assert read_until(ws, first)[0]["type"] == "Begin"
    ws.close()


@pytest.mark.parametrize(("key", "query", "start"), [
    (None, "speech_model=u3-rt-pro", "Unauthorized Connection: Missing Authorization header"),
    ("nope", "speech_model=u3-rt-pro", "Unauthorized Connection: Invalid API key"),
])
def test_bad_auth_is_error_1008(make_double: MakeDouble, key: str | None, query: str,
                                start: str) -> None:
    expect_error(connect(make_double(), query, key=key), 1008, start)


def test_temporary_token_in_the_query_is_accepted(make_double: MakeDouble) -> None:
    ws = connect(make_double(), f"speech_model=u3-rt-pro&token={KEY}", key=None)
    assert read_until(ws, first)[0]["type"] == "Begin"
    ws.close()


def test_http_level_refusals(make_double: MakeDouble) -> None:
    double = make_double(reject_auth_with_http_401=True)
    for key, path, status in ((None, "/v3/ws", 401), (KEY, "/v2/realtime/ws", 410),
                              (KEY, "/elsewhere", 404)):
        with pytest.raises(websocket.WebSocketBadStatusException) as caught:
            connect(double, key=key, path=path)
        assert caught.value.status_code == status
    assert [r.closed_by for r in double.records()] == ["http"] * 3


@pytest.mark.parametrize(("message", "start"), [
    ('{"type": "Shout"}', "Invalid Message Type: Shout"),
    ("{not json", "Invalid JSON: "),
    ("[]", "Invalid Message: "),
    ('{"type": "UpdateConfiguration", "sample_rate": 8000}',
     "User Input Validation Error: Invalid 'sample_rate'"),
])
def test_bad_client_messages_are_error_3006(make_double: MakeDouble, message: str,
                                            start: str) -> None:
    double = make_double()
    ws = connect(double)
    ws.send(message)
    expect_error(ws, 3006, start)
    assert double.wait_for_session(0, closed=True).received[-1] == "invalid"


@pytest.mark.parametrize(("rate", "size", "ms"), [
    (16000, 800, "25"), (16000, 32002, "1000.06"), (16000, 1599, "49.9688"), (8000, 400, "25"),
])
def test_audio_messages_outside_50_to_1000_ms_are_error_3007(
        make_double: MakeDouble, rate: int, size: int, ms: str) -> None:
    ws = connect(make_double(), f"speech_model=u3-rt-pro&sample_rate={rate}")
    ws.send_binary(b"\0" * (rate // 10))                  # 50 ms at 8 kHz, 100 ms at 16 kHz: fine
    ws.send_binary(b"\0" * size)
    expect_error(ws, 3007, f"Input duration violation: {ms} ms. Expected between 50 and 1000 ms")


def test_audio_faster_than_real_time_is_error_3007(make_double: MakeDouble) -> None:
    ws = connect(make_double(enforce_pacing=True, burst_allowance_s=0.5))
    with contextlib.suppress(websocket.WebSocketException, OSError):
        for _ in range(5):
            ws.send_binary(b"\0" * 32000)                 # 1 s per message, as fast as possible
    text = expect_error(ws, 3007, "Audio Transmission Rate Exceeded: Received ")
    received, elapsed = (float(x) for x in text.removeprefix(
        "Audio Transmission Rate Exceeded: Received ").removesuffix(" sec").split(
        " sec. audio in "))
    assert received > elapsed + 0.5


# -- faults ----------------------------------------------------------------------------------


def test_refuse_next_connections_then_accept(make_double: MakeDouble) -> None:
    double = make_double(reject_first=2)
    for _ in range(2):
        expect_error(connect(double), 3009, "Unauthorized Connection: Too many concurrent")
    ws = connect(double)
    assert read_until(ws, first)[0]["type"] == "Begin"
    ws.close()
    assert [r.accepted for r in double.records()] == [False, False, True]


def test_close_before_begin_sends_only_a_close(make_double: MakeDouble) -> None:
    messages, code, reason = read_until_close(connect(
        make_double(close_before_begin=(1008, "Unauthorized Connection: account disabled"))))
    assert (messages, code, reason) == ([], 1008, "Unauthorized Connection: account disabled")


@pytest.mark.parametrize(("fault", "code", "start"), [
    ("fail", 3005, "Session Cancelled: An error occurred"),
    ("expire", 3008, "Session Expired: Maximum session duration exceeded"),
])
def test_mid_session_errors_are_an_error_frame_then_the_same_close(
        make_double: MakeDouble, fault: str, code: int, start: str) -> None:
    double = make_double()
    ws = connect(double)
    send_audio(ws, compose(0.3, digits_phrase([1, 2, 3])))
    session_id = double.wait_for_session(0).session_id
    getattr(double, fault)(session_id)
    expect_error(ws, code, start)
    record = double.wait_for_session(0, closed=True)
    assert (record.closed_by, record.close_code) == ("server", code)
    assert record.sent_types()[-1] == "Error"


def test_drop_cuts_tcp_without_a_close_frame(make_double: MakeDouble) -> None:
    double = make_double()
    ws = connect(double)
    read_for(ws, 0.1)
    double.drop()
    ws.settimeout(3)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        ws.recv()
    ws.shutdown()
    assert double.wait_for_session(0, closed=True).closed_by == "drop"


def test_ignored_terminate_keeps_the_socket_open(make_double: MakeDouble) -> None:
    double = make_double(ignore_terminate=True)
    ws = connect(double)
    read_for(ws, 0.1)
    ws.send(json.dumps({"type": "Terminate"}))
    assert read_for(ws, 0.5) == []
    double.set_ignore_terminate(False)
    ws.send(json.dumps({"type": "Terminate"}))
    messages, code, _ = read_until_close(ws)
    assert [m["type"] for m in messages] == ["Termination"] and code == 1000


def test_slow_begin(make_double: MakeDouble) -> None:
    ws = connect(make_double(begin_delay_s=0.6))
    start = time.monotonic()
    assert read_until(ws, first, timeout=2)[0]["type"] == "Begin"
    assert time.monotonic() - start >= 0.55
    ws.close()


# -- scale and the command line --------------------------------------------------------------


def test_many_concurrent_sessions_each_get_their_own_digits(make_double: MakeDouble) -> None:
    double = make_double(decode_workers=2, keep_audio=False)
    rng = random.Random(7)
    phrases = [[rng.randrange(10) for _ in range(rng.randint(2, 5))] for _ in range(40)]
    audio = {i: compose(0.2, digits_phrase(p), 0.6) for i, p in enumerate(phrases)}
    results: dict[int, list[str]] = {}

    def client(i: int) -> None:
        ws = connect(double)
        send_audio(ws, audio[i])
        ws.send(json.dumps({"type": "Terminate"}))
        messages, _, _ = read_until_close(ws, timeout=30)
        results[i] = [m["transcript"] for m in messages if m["type"] == "Turn" and m["end_of_turn"]]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(phrases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i, digits in enumerate(phrases):
        words = [DIGIT_WORDS[d] for d in digits]
        assert results[i] == [(" ".join(words).capitalize() + ".")]
    records = double.sessions()
    assert len(records) == len(phrases)
    assert all(r.audio == b"" and r.audio_messages > 20 for r in records)


def test_runs_alone_from_the_command_line() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.double", "--port", "0", "--key", "cli-key"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("ws://127.0.0.1:") and url.endswith("/v3/ws")
        session = StreamingSession(url, "cli-key", StreamingParams())
        assert session.open(timeout=10).id
        assert session.terminate(timeout=5) is not None
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_bad_configuration_is_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="mode"):
        DoubleConfig(mode="whisper")
    result = subprocess.run([sys.executable, "-m", "tests.double", "--decode-workers", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "python -m tests.double: decode_workers must be at least 1"
