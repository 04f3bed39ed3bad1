"""StreamingSession against the local AssemblyAI double: every way a session can end."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import websocket

from tests.double import DoubleServer
from tests.support.doubles import MakeDouble, double_maker
from tests.support.speech import compose, digits_phrase
from transcriber.aai import (
    Begin,
    ErrorKind,
    Event,
    FinalTurnFilter,
    SpeechStarted,
    StreamingError,
    StreamingParams,
    StreamingSession,
    Termination,
    Turn,
)

KEY = "test-key-7f3a"
CHUNK = 800                  # 50 ms at 16 kHz

@pytest.fixture
def make_double() -> Iterator[MakeDouble]:
    with double_maker(KEY) as make:
        yield make


def clip(*parts: str | float) -> bytes:
    """Speech and silence, padded with silence to whole 50 ms chunks."""
    samples = compose(*parts)
    samples = np.concatenate([samples, np.zeros(-samples.size % CHUNK, dtype="<i2")])
    return samples.tobytes()


def new_session(double: DoubleServer, key: str = KEY, params: StreamingParams | None = None,
                **kwargs: object) -> StreamingSession:
    return StreamingSession(double.url, key, params or StreamingParams(), **kwargs)  # type: ignore[arg-type]


def stream(session: StreamingSession, audio: bytes, *, realtime: bool = False) -> list[Event]:
    """Send ``audio`` in 50 ms messages (paced at real time if asked), collecting events."""
    events: list[Event] = []
    step = CHUNK * 2
    start = time.monotonic()
    for index, offset in enumerate(range(0, len(audio), step)):
        session.send_audio(audio[offset:offset + step])
        if realtime:
            due = start + (index + 1) * 0.05
            while (left := due - time.monotonic()) > 0:
                event = session.recv(left)
                if event is not None:
                    events.append(event)
        else:
            while (event := session.recv(0)) is not None:
                events.append(event)
    return events


def collect(session: StreamingSession, events: list[Event],
            until: Callable[[list[Event]], bool], timeout: float = 10.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    while not until(events):
        left = deadline - time.monotonic()
        assert left > 0, f"events so far: {events}"
        event = session.recv(min(left, 0.5))
        if event is not None:
            events.append(event)
    return events


def finals(events: list[Event], format_turns: bool = True) -> list[Turn]:
    rule = FinalTurnFilter(format_turns)
    out: list[Turn] = []
    for event in events:
        if isinstance(event, Turn):
            out.extend(rule.feed_all(event))
    held = rule.flush()
    return out + ([held] if held is not None else [])


def final_count(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len(finals(events)) >= n


def drain(session: StreamingSession, timeout: float = 5.0) -> StreamingError:
    """Receive until the session fails; the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            session.recv(0.2)
        except StreamingError as exc:
            return exc
    raise AssertionError("the session did not end")


# -- the happy path --------------------------------------------------------------------------


def test_digits_paced_at_real_time_come_back_as_one_formatted_final(
        make_double: MakeDouble) -> None:
    double = make_double(enforce_pacing=True)
    audio = clip(0.3, digits_phrase([4, 7, 2, 1]), 0.8)
    session = new_session(double)
    begin = session.open(timeout=5)
    assert isinstance(begin, Begin) and session.session_id == begin.id
    assert begin.expires_at > time.time() + 10000
    events = stream(session, audio, realtime=True)
    collect(session, events, final_count(1), timeout=5)
    late: list[Event] = []
    termination = session.terminate(timeout=5, on_event=late.append)
    assert isinstance(termination, Termination)
    assert termination.audio_duration_seconds == round(len(audio) / 32000)
    turns = finals(events + late)
    assert [t.transcript for t in turns] == ["Four seven two one."]
    final = turns[0]
    assert final.end_of_turn and final.turn_is_formatted and final.turn_order == 0
    assert final.utterance == final.transcript
    assert [w.text for w in final.words] == ["Four", "seven", "two", "one."]
    assert all(w.word_is_final for w in final.words)
    assert 250 <= final.words[0].start_ms <= 350           # speech starts at 300 ms
    assert final.words[-1].end_ms <= len(audio) // 32
    started = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(started) == 1 and 250 <= started[0].timestamp_ms <= 350
    assert session.closed and session.error is not None
    assert session.error.kind is ErrorKind.CLOSED and session.error.code == 1000
    record = double.wait_for_session(0, closed=True)
    assert record.audio == audio                            # nothing lost, duplicated, reordered
    assert record.audio_messages == len(audio) // (CHUNK * 2)
    assert record.terminate_received and record.close_code == 1000


def test_query_string_and_headers_as_the_server_sees_them(make_double: MakeDouble) -> None:
    double = make_double()
    params = StreamingParams(format_turns=False, keyterms_prompt=("edgescribe", "Redis streams"),
                             min_turn_silence_ms=200, max_turn_silence_ms=900)
    session = new_session(double, params=params, user_agent="edgescribe-test/1")
    session.open(timeout=5)
    session.close()
    record = double.wait_for_session(0)
    query = record.params
    assert query["speech_model"] == "u3-rt-pro"
    assert query["format_turns"] == "false"
    assert json.loads(query["keyterms_prompt"]) == ["edgescribe", "Redis streams"]
    assert [k for k, _ in record.query].count("keyterms_prompt") == 1
    assert (query["min_turn_silence"], query["max_turn_silence"]) == ("200", "900")
    assert record.authorization == KEY                       # raw key, no "Bearer"
    assert record.user_agent == "edgescribe-test/1"


# -- refusals before Begin -------------------------------------------------------------------


def open_fails(double: DoubleServer, timeout: float = 10.0, **kwargs: object) -> StreamingError:
    session = new_session(double, **kwargs)  # type: ignore[arg-type]
    start = time.monotonic()
    with pytest.raises(StreamingError) as caught:
        session.open(timeout=timeout)
    caught.value.elapsed = time.monotonic() - start  # type: ignore[attr-defined]
    assert session.closed
    return caught.value


def test_wrong_key_is_an_auth_error_that_names_no_key(make_double: MakeDouble) -> None:
    error = open_fails(make_double(), key="sk-wrong-secret-0001")
    assert (error.kind, error.code, error.retryable) == (ErrorKind.AUTH, 1008, False)
    assert error.reason.startswith("Unauthorized Connection")
    assert error.elapsed < 2  # type: ignore[attr-defined]
    assert "sk-wrong-secret-0001" not in str(error) + repr(error)


def test_http_level_auth_refusal(make_double: MakeDouble) -> None:
    error = open_fails(make_double(reject_auth_with_http_401=True), key="sk-wrong-secret-0002")
    assert (error.kind, error.code, error.retryable) == (ErrorKind.AUTH, 401, False)
    assert "sk-wrong-secret-0002" not in str(error)


@pytest.mark.parametrize(("code", "reason", "kind"), [
    (3009, "Unauthorized Connection: Too many concurrent sessions", ErrorKind.RATE_LIMIT),
    (1008, "Unauthorized Connection: Too many concurrent sessions", ErrorKind.RATE_LIMIT),
    (429, "Too Many Requests", ErrorKind.RATE_LIMIT),
    (503, "Service Unavailable", ErrorKind.SERVER),
])
def test_rate_limits_and_overload_are_retryable(make_double: MakeDouble, code: int, reason: str,
                                                kind: ErrorKind) -> None:
    double = make_double()
    double.reject_next(1, code, reason)
    error = open_fails(double)
    assert (error.kind, error.code, error.retryable) == (kind, code, True)
    retry = new_session(double)
    assert isinstance(retry.open(timeout=5), Begin)     # only the next connection was refused
    retry.close()


def test_unknown_model_is_invalid_and_not_retryable(make_double: MakeDouble) -> None:
    error = open_fails(make_double(), params=StreamingParams(speech_model="no-such-model"))
    assert (error.kind, error.code, error.retryable) == (ErrorKind.INVALID, 3006, False)
    assert "speech_model" in error.reason


def test_retired_v2_endpoint(make_double: MakeDouble) -> None:
    double = make_double()
    session = StreamingSession(double.url.replace("/v3/ws", "/v2/realtime/ws"), KEY,
                               StreamingParams())
    with pytest.raises(StreamingError) as caught:
        session.open(timeout=5)
    assert (caught.value.kind, caught.value.code, caught.value.retryable) == \
        (ErrorKind.INVALID, 410, False)


@pytest.mark.parametrize(("code", "kind"), [(1008, ErrorKind.AUTH), (3005, ErrorKind.SERVER)])
def test_close_before_begin_fails_open_promptly(make_double: MakeDouble, code: int,
                                                kind: ErrorKind) -> None:
    error = open_fails(make_double(close_before_begin=(code, "Unauthorized Connection: nope"
                                                       if code == 1008 else "")), timeout=10)
    assert (error.kind, error.code) == (kind, code)
    assert error.elapsed < 2  # type: ignore[attr-defined]


def test_begin_later_than_the_timeout(make_double: MakeDouble) -> None:
    error = open_fails(make_double(begin_delay_s=3.0), timeout=0.5)
    assert (error.kind, error.retryable) == (ErrorKind.TIMEOUT, True)
    assert 0.45 <= error.elapsed < 1.5  # type: ignore[attr-defined]


def test_nobody_listening_is_a_network_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = StreamingSession(f"ws://127.0.0.1:{port}/v3/ws", KEY, StreamingParams())
    with pytest.raises(StreamingError) as caught:
        session.open(timeout=5)
    assert (caught.value.kind, caught.value.retryable) == (ErrorKind.NETWORK, True)


# -- ends during a session -------------------------------------------------------------------


def opened(double: DoubleServer, **kwargs: object) -> StreamingSession:
    session = new_session(double, **kwargs)  # type: ignore[arg-type]
    session.open(timeout=5)
    return session


def test_server_error_frame_and_close_become_one_error(make_double: MakeDouble) -> None:
    double = make_double()
    session = opened(double)
    long_message = "Session Cancelled: An error occurred " + "x" * 150    # close reason is cut
    double.fail(session.session_id, 3005, long_message)
    error = drain(session)
    assert (error.kind, error.code, error.retryable) == (ErrorKind.SERVER, 3005, True)
    assert error.reason == long_message
    with pytest.raises(StreamingError) as again:
        session.recv(0.1)
    assert again.value is error
    with pytest.raises(StreamingError):
        session.send_audio(b"\0" * CHUNK * 2)
    assert double.wait_for_session(0, closed=True).close_reason == "See Error message for details"


def test_expiry_is_retryable_with_a_new_session(make_double: MakeDouble) -> None:
    double = make_double(max_session_s=1.0)
    session = opened(double)
    assert session.expires_at is not None and session.expires_at <= time.time() + 2
    error = drain(session)
    assert (error.kind, error.code, error.retryable) == (ErrorKind.EXPIRED, 3008, True)
    assert error.reason == "Session Expired: Maximum session duration exceeded"


@pytest.mark.parametrize(("expiry", "kind", "code", "retryable"), [
    ("termination", ErrorKind.CLOSED, 1000, True),
    ("both", ErrorKind.EXPIRED, 3008, True),
])
def test_expiry_announced_by_termination(make_double: MakeDouble, expiry: str, kind: ErrorKind,
                                         code: int, retryable: bool) -> None:
    session = opened(make_double(max_session_s=0.5, expiry=expiry))
    events = collect(session, [], lambda e: any(isinstance(x, Termination) for x in e))
    assert isinstance(events[-1], Termination)
    error = drain(session)
    # We never sent Terminate: the server ended the session, so a new one may follow.
    assert (error.kind, error.code, error.retryable) == (kind, code, retryable)


def test_dropped_connection_is_a_network_error(make_double: MakeDouble) -> None:
    double = make_double()
    session = opened(double)
    stream(session, clip(0.5))
    double.drop(session.session_id)
    start = time.monotonic()
    error = drain(session)
    assert (error.kind, error.retryable) == (ErrorKind.NETWORK, True)
    assert error.code in (None, 1006)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize(("payload", "code", "reason"), [
    (b"\0" * 800, 3007, "Input duration violation: 25 ms. Expected between 50 and 1000 ms"),
    ('{"type": "Shout"}', 3006, "Invalid Message Type: Shout"),
])
def test_protocol_violations_are_invalid_and_not_retryable(
        make_double: MakeDouble, payload: bytes | str, code: int, reason: str) -> None:
    double = make_double()
    sockets: list[websocket.WebSocket] = []

    def connect(url: str, **options: object) -> websocket.WebSocket:
        ws = websocket.create_connection(url, **options)
        sockets.append(ws)
        return ws

    session = opened(double, connect=connect)
    for size in (CHUNK * 2 - 2, 32002, 801):
        with pytest.raises(ValueError, match=r"ms|whole"):
            session.send_audio(b"\0" * size)
    sockets[0].send(payload, websocket.ABNF.OPCODE_BINARY if isinstance(payload, bytes)
                    else websocket.ABNF.OPCODE_TEXT)        # behind the client's back
    error = drain(session)
    assert (error.kind, error.code, error.retryable) == (ErrorKind.INVALID, code, False)
    assert error.reason == reason


def test_sending_faster_than_real_time_is_retryable_after_fixing_pacing(
        make_double: MakeDouble) -> None:
    double = make_double(enforce_pacing=True, burst_allowance_s=0.5)
    session = opened(double)
    audio = clip(3.0)
    with pytest.raises(StreamingError) as caught:
        for offset in range(0, len(audio), 3200):
            session.send_audio(audio[offset:offset + 3200])    # 100 ms each, no waiting
            time.sleep(0.001)
        raise drain(session)
    error = session.error or caught.value
    if error.kind is ErrorKind.NETWORK:        # a send hit the closed socket first
        error = drain(session)
    assert (error.kind, error.code, error.retryable) == (ErrorKind.INVALID, 3007, True)
    assert error.reason.startswith("Audio Transmission Rate Exceeded: Received ")


def test_terminate_without_termination_stays_bounded(make_double: MakeDouble) -> None:
    double = make_double(ignore_terminate=True)
    session = opened(double)
    stream(session, clip(0.3, digits_phrase([5, 5]), 0.2))
    start = time.monotonic()
    assert session.terminate(timeout=1.0) is None
    assert time.monotonic() - start <= 1.5
    assert session.closed
    record = double.wait_for_session(0, closed=True)
    assert record.terminate_received and record.closed_by == "client"


def test_terminate_is_bounded_by_the_injected_clock(make_double: MakeDouble) -> None:
    now, step = [0.0], [0.0]

    def clock() -> float:
        now[0] += step[0]
        return now[0]

    session = opened(make_double(ignore_terminate=True), clock=clock)
    step[0] = 2.0                                   # from now on, every reading is 2 s later
    start = time.monotonic()
    assert session.terminate(timeout=5.0) is None           # 5 "seconds" pass in a few reads
    assert time.monotonic() - start < 1.0


def test_termination_is_returned_then_the_clean_close_is_raised(make_double: MakeDouble) -> None:
    session = opened(make_double())
    stream(session, clip(0.3, digits_phrase([3, 9]), 0.1))
    session.send_terminate()
    events = collect(session, [], lambda e: any(isinstance(x, Termination) for x in e))
    assert [t.transcript for t in finals(events)] == ["Three nine."]   # flushed by Terminate
    error = drain(session)
    assert (error.kind, error.code, error.retryable) == (ErrorKind.CLOSED, 1000, False)
    assert session.closed and session.termination == events[-1]
    assert session.terminate(timeout=1) == session.termination       # idempotent


def test_unknown_and_malformed_messages_are_skipped(make_double: MakeDouble) -> None:
    double = make_double()
    session = opened(double)
    sid = session.session_id
    double.inject(sid, {"type": "Heartbeat", "total_audio_received_ms": 0,
                        "total_duration_ms": 1, "realtime_factor": 0.0})
    double.inject(sid, {"type": "SomethingNew", "x": 1})
    double.inject(sid, "this is not JSON")
    double.inject(sid, {"type": "Turn", "turn_order": "zero"})
    double.inject(sid, {"type": "SpeechStarted", "timestamp": 5, "confidence": 0.5})
    events = collect(session, [], lambda e: len(e) >= 1, timeout=3)
    assert events == [SpeechStarted(timestamp_ms=5, confidence=0.5)]
    assert not session.closed
    session.close()


# -- turns -----------------------------------------------------------------------------------


TWO_FINALS = ["Four seven two one.", "Nine zero three eight."]


def two_phrases() -> bytes:
    return clip(0.3, digits_phrase([4, 7, 2, 1]), 0.8, digits_phrase([9, 0, 3, 8]), 0.8)


def test_u3_turns_have_partials_and_exactly_one_formatted_final_each(
        make_double: MakeDouble) -> None:
    session = opened(make_double())
    events = collect(session, stream(session, two_phrases()), final_count(2))
    session.terminate(timeout=5, on_event=events.append)
    turns = [e for e in events if isinstance(e, Turn)]
    ends = [t for t in turns if t.end_of_turn]
    assert [t.turn_order for t in ends] == [0, 1]
    assert all(t.turn_is_formatted and t.end_of_turn_confidence == 1.0 for t in ends)
    assert any(not t.end_of_turn for t in turns)
    assert all(not w.word_is_final for t in turns if not t.end_of_turn for w in t.words)
    assert [t.transcript for t in finals(events)] == TWO_FINALS


def test_universal_turns_with_a_second_formatted_final(make_double: MakeDouble) -> None:
    double = make_double(second_formatted_final=True)
    session = opened(double, params=StreamingParams(speech_model="universal-streaming-english"))
    events = collect(session, stream(session, two_phrases()), final_count(2))
    session.terminate(timeout=5, on_event=events.append)
    ends = [e for e in events if isinstance(e, Turn) and e.end_of_turn]
    assert [(t.turn_order, t.turn_is_formatted) for t in ends] == \
        [(0, False), (0, True), (1, False), (1, True)]
    assert not any(isinstance(e, SpeechStarted) for e in events)
    assert [t.transcript for t in finals(events)] == TWO_FINALS
    assert [t.transcript for t in finals(events, format_turns=False)] == \
        ["four seven two one", "nine zero three eight"]
    partials = [e for e in events if isinstance(e, Turn) and not e.end_of_turn]
    assert partials, "Universal-Streaming sends turns while speech goes on"
    for partial in partials:
        final_words = [w.text for w in partial.words if w.word_is_final]
        assert partial.transcript == " ".join(final_words)


def test_force_endpoint_ends_the_turn_without_waiting_for_silence(
        make_double: MakeDouble) -> None:
    double = make_double()
    session = opened(double)
    events = stream(session, clip(0.3, digits_phrase([6, 1, 6])))
    session.force_endpoint()
    collect(session, events, final_count(1), timeout=5)
    assert [t.transcript for t in finals(events)] == ["Six one six."]
    session.keep_alive()
    session.update_configuration(max_turn_silence_ms=700, keyterms_prompt=["six"])
    with pytest.raises(ValueError, match="cannot be changed"):
        session.update_configuration(sample_rate=8000)
    session.terminate(timeout=5)
    record = double.wait_for_session(0, closed=True)
    assert [m["type"] for m in record.control] == \
        ["ForceEndpoint", "KeepAlive", "UpdateConfiguration", "Terminate"]
    assert record.control[2] == {"type": "UpdateConfiguration", "max_turn_silence": 700,
                                 "keyterms_prompt": ["six"]}


# -- threads ---------------------------------------------------------------------------------


def test_one_thread_sends_while_another_receives(make_double: MakeDouble) -> None:
    double = make_double()
    session = opened(double)
    audio = two_phrases()
    sent = threading.Event()

    def sender() -> None:
        for offset in range(0, len(audio), CHUNK * 2):
            session.send_audio(audio[offset:offset + CHUNK * 2])
        sent.set()

    thread = threading.Thread(target=sender, name="test-sender")
    thread.start()
    events = collect(session, [], final_count(2))
    thread.join(5)
    assert sent.is_set()
    session.terminate(timeout=5, on_event=events.append)
    assert [t.transcript for t in finals(events)] == TWO_FINALS
    assert double.wait_for_session(0, closed=True).audio == audio


def test_close_from_another_thread_wakes_a_waiting_reader(make_double: MakeDouble) -> None:
    session = opened(make_double())
    timer = threading.Timer(0.2, session.close)
    timer.start()
    start = time.monotonic()
    with pytest.raises(StreamingError) as caught:
        session.recv(5.0)
    assert time.monotonic() - start < 1.5
    assert caught.value.kind is ErrorKind.CLOSED
    session.close()                                            # idempotent
    timer.join()


def test_repr_and_errors_never_show_the_key(make_double: MakeDouble) -> None:
    double = make_double()
    session = opened(double)
    assert KEY not in repr(session)
    double.fail(session.session_id)
    error = drain(session)
    assert KEY not in str(error) + repr(error) + repr(session)
