"""The protocol client's pure parts: parameters, URL, events, close codes, the final-turn rule."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transcriber.aai import (
    Begin,
    ErrorKind,
    FinalTurnFilter,
    ProtocolError,
    ServerError,
    SpeechStarted,
    StreamingError,
    StreamingParams,
    Termination,
    Turn,
    build_url,
    classify_close,
    classify_http_status,
    parse_message,
)

# -- parameters and URL ----------------------------------------------------------------------


def test_query_always_carries_model_and_explicit_lowercase_booleans() -> None:
    assert dict(StreamingParams().query()) == {
        "speech_model": "u3-rt-pro", "sample_rate": "16000", "encoding": "pcm_s16le",
        "format_turns": "true"}
    assert dict(StreamingParams(format_turns=False).query())["format_turns"] == "false"


def test_keyterms_travel_as_one_json_array_and_silences_under_their_wire_names() -> None:
    params = StreamingParams(keyterms_prompt=("edge scribe", 'quote"d'),
                             min_turn_silence_ms=160, max_turn_silence_ms=1200,
                             end_of_turn_confidence_threshold=0.4)
    url = build_url("wss://streaming.assemblyai.com/v3/ws", params)
    pairs = parse_qsl(urlsplit(url).query)
    names = [name for name, _ in pairs]
    assert names.count("keyterms_prompt") == 1
    query = dict(pairs)
    assert json.loads(query["keyterms_prompt"]) == ["edge scribe", 'quote"d']
    assert query["min_turn_silence"] == "160"
    assert query["max_turn_silence"] == "1200"
    assert query["end_of_turn_confidence_threshold"] == "0.4"
    assert "min_turn_silence_ms" not in query
    assert url.startswith("wss://streaming.assemblyai.com/v3/ws?")


def test_build_url_keeps_foreign_parameters_and_replaces_ours() -> None:
    url = build_url("ws://127.0.0.1:9/v3/ws?region=x&speech_model=old", StreamingParams())
    query = parse_qsl(urlsplit(url).query)
    assert ("region", "x") in query
    assert [v for k, v in query if k == "speech_model"] == ["u3-rt-pro"]


@pytest.mark.parametrize("url", ["https://streaming.assemblyai.com/v3/ws", "ws://", "localhost:80"])
def test_build_url_rejects_non_websocket_urls(url: str) -> None:
    with pytest.raises(ValueError, match="ws:// or wss://"):
        build_url(url, StreamingParams())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keyterms_prompt": tuple(f"t{i}" for i in range(101))}, "at most 100"),
    ({"keyterms_prompt": ("x" * 51,)}, "at most 50"),
    ({"keyterms_prompt": ("",)}, "non-empty"),
    ({"keyterms_prompt": "one string"}, "list of strings"),
    ({"encoding": "opus"}, "encoding"),
    ({"sample_rate": 16000.0}, "sample_rate"),
    ({"speech_model": ""}, "speech_model"),
    ({"end_of_turn_confidence_threshold": 1.5}, "0–1"),
    ({"min_turn_silence_ms": 900, "max_turn_silence_ms": 400}, "exceeds"),
])
def test_params_are_validated_with_a_clear_message(kwargs: dict[str, object],
                                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StreamingParams(**kwargs)  # type: ignore[arg-type]


def test_keyterms_given_as_a_list_become_a_tuple() -> None:
    params = StreamingParams(keyterms_prompt=["a", "b"])  # type: ignore[arg-type]
    assert params.keyterms_prompt == ("a", "b")
    hash(params)


# -- events ----------------------------------------------------------------------------------


def test_every_server_message_parses_and_extra_fields_are_tolerated() -> None:
    begin = parse_message('{"type":"Begin","id":"s1","expires_at":1759796682,'
                          '"configuration":{"model":"u3-rt-pro"}}')
    assert begin == Begin(id="s1", expires_at=1759796682)
    assert begin.raw["configuration"] == {"model": "u3-rt-pro"}
    started = parse_message(b'{"type":"SpeechStarted","timestamp":1216,"confidence":0.98}')
    assert started == SpeechStarted(timestamp_ms=1216, confidence=0.98)
    turn = parse_message(json.dumps({
        "type": "Turn", "turn_order": 3, "turn_is_formatted": True, "end_of_turn": True,
        "transcript": "Hi.", "end_of_turn_confidence": 1, "utterance": "Hi.",
        "language_code": "en", "speaker_label": "A",
        "words": [{"text": "Hi.", "start": 10, "end": 250, "confidence": 0.9,
                   "word_is_final": True, "speaker": "A"}]}))
    assert isinstance(turn, Turn)
    assert (turn.turn_order, turn.transcript, turn.utterance) == (3, "Hi.", "Hi.")
    assert turn.words[0].start_ms == 10 and turn.words[0].end_ms == 250
    assert turn.raw["speaker_label"] == "A"
    assert parse_message('{"type":"Termination","audio_duration_seconds":7,'
                         '"session_duration_seconds":8}') == Termination(7, 8)


def test_error_frames_parse_in_both_shapes() -> None:
    assert parse_message('{"type":"Error","error_code":3008,"error":"Session Expired"}') \
        == ServerError(code=3008, message="Session Expired")
    assert parse_message('{"error":"Invalid API key"}') == ServerError(None, "Invalid API key")


def test_unknown_types_are_ignored_and_garbage_is_a_protocol_error() -> None:
    assert parse_message('{"type":"Heartbeat","total_audio_received_ms":5}') is None
    assert parse_message('{"type":"FromTheFuture"}') is None
    assert parse_message('{"no_type": 1}') is None
    for bad in ("not json", "[1, 2]", '"text"', '{"type":"Turn","turn_order":"x"}',
                '{"type":"Begin"}'):
        with pytest.raises(ProtocolError):
            parse_message(bad)


def test_event_reprs_leave_the_raw_message_out() -> None:
    event = parse_message('{"type":"Begin","id":"s1","expires_at":1,"secretish":"x"}')
    assert "secretish" not in repr(event)


# -- close codes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "reason", "kind", "retryable"), [
    (1008, "Unauthorized Connection: Missing Authorization header", ErrorKind.AUTH, False),
    (1008, "Unauthorized Connection: insufficient balance", ErrorKind.AUTH, False),
    (1008, "Unauthorized Connection: Too many concurrent sessions", ErrorKind.RATE_LIMIT, True),
    (3009, "Unauthorized Connection: Too many concurrent sessions", ErrorKind.RATE_LIMIT, True),
    (3008, "Session Expired: Maximum session duration exceeded", ErrorKind.EXPIRED, True),
    (3006, "Invalid Message Type: Foo", ErrorKind.INVALID, False),
    (3007, "Input duration violation: 25 ms. Expected between 50 and 1000 ms",
     ErrorKind.INVALID, False),
    (3007, "Audio Transmission Rate Exceeded: Received 3.0 sec. audio in 1.0 sec",
     ErrorKind.INVALID, True),
    (3005, "Session Cancelled: An error occurred", ErrorKind.SERVER, True),
    (1006, "", ErrorKind.NETWORK, True),
    (None, "", ErrorKind.NETWORK, True),
    (1000, "", ErrorKind.CLOSED, True),
    (1011, "", ErrorKind.SERVER, True),
    (1012, "", ErrorKind.SERVER, True),
    (1013, "", ErrorKind.SERVER, True),
    (1001, "", ErrorKind.SERVER, True),
    (4001, "Not Authorized", ErrorKind.AUTH, False),
    (4002, "Insufficient Funds", ErrorKind.AUTH, False),
    (4029, "Client sent audio too fast", ErrorKind.INVALID, True),
    (4031, "Session idle for too long", ErrorKind.CLOSED, True),
    (4104, "something new", ErrorKind.SERVER, True),
    (410, "Deprecated endpoint", ErrorKind.INVALID, False),
])
def test_close_codes_map_to_kinds(code: int | None, reason: str, kind: ErrorKind,
                                  retryable: bool) -> None:
    error = classify_close(code, reason)
    assert (error.kind, error.code, error.retryable) == (kind, code, retryable)
    assert error.reason


@pytest.mark.parametrize(("status", "kind", "retryable"), [
    (401, ErrorKind.AUTH, False), (403, ErrorKind.AUTH, False),
    (429, ErrorKind.RATE_LIMIT, True), (500, ErrorKind.SERVER, True),
    (503, ErrorKind.SERVER, True), (404, ErrorKind.INVALID, False),
])
def test_http_statuses_map_to_kinds(status: int, kind: ErrorKind, retryable: bool) -> None:
    error = classify_http_status(status)
    assert (error.kind, error.code, error.retryable) == (kind, status, retryable)


def test_streaming_error_reads_well() -> None:
    error = StreamingError(ErrorKind.EXPIRED, 3008, "Session Expired")
    assert str(error) == "expired 3008: Session Expired (retryable)"
    assert "EXPIRED" in repr(error)


# -- final-turn rule -------------------------------------------------------------------------


def _turn(order: int, text: str, *, end: bool, formatted: bool) -> Turn:
    return Turn(turn_order=order, transcript=text, end_of_turn=end, turn_is_formatted=formatted,
                end_of_turn_confidence=1.0 if end else 0.0, words=(), utterance="")


def test_formatted_twin_replaces_the_unformatted_final() -> None:
    finals = FinalTurnFilter(format_turns=True)
    assert finals.feed(_turn(0, "four", end=False, formatted=False)) is None
    assert finals.feed(_turn(0, "four two", end=True, formatted=False)) is None
    assert finals.holding is not None
    published = finals.feed(_turn(0, "Four two.", end=True, formatted=True))
    assert published is not None and published.transcript == "Four two."
    assert finals.feed(_turn(0, "Four two.", end=True, formatted=True)) is None
    assert finals.flush() is None


def test_held_unformatted_final_is_published_when_the_next_turn_starts_or_at_flush() -> None:
    finals = FinalTurnFilter(format_turns=True)
    assert finals.feed(_turn(0, "four", end=True, formatted=False)) is None
    released = finals.feed(_turn(1, "", end=False, formatted=False))
    assert released is not None and released.transcript == "four"
    assert finals.feed(_turn(0, "Four.", end=True, formatted=True)) is None   # too late
    assert finals.feed(_turn(1, "nine", end=True, formatted=False)) is None
    held = finals.flush()
    assert held is not None and held.transcript == "nine"
    assert finals.flush() is None


def test_one_message_completing_two_turns_loses_neither() -> None:
    finals = FinalTurnFilter(format_turns=True)
    assert finals.feed_all(_turn(0, "four", end=True, formatted=False)) == []
    both = finals.feed_all(_turn(1, "Nine.", end=True, formatted=True))
    assert [t.transcript for t in both] == ["four", "Nine."]
    one_by_one = FinalTurnFilter(format_turns=True)
    one_by_one.feed(_turn(0, "four", end=True, formatted=False))
    first = one_by_one.feed(_turn(1, "Nine.", end=True, formatted=True))
    second = one_by_one.flush()
    assert first is not None and second is not None
    assert [first.transcript, second.transcript] == ["four", "Nine."]


def test_without_formatting_the_first_end_of_turn_is_final() -> None:
    finals = FinalTurnFilter(format_turns=False)
    first = finals.feed(_turn(0, "four", end=True, formatted=False))
    assert first is not None and first.transcript == "four"
    assert finals.feed(_turn(0, "Four.", end=True, formatted=True)) is None


_messages = st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), max_size=30)


@given(_messages, st.booleans())
def test_exactly_one_final_per_turn_order_and_the_formatted_one_when_available(
        messages: list[tuple[int, bool, bool]], format_turns: bool) -> None:
    # A server sends turn orders in non-decreasing order.
    turns = [_turn(order, f"{order}{'F' if formatted else 'u'}", end=end, formatted=formatted)
             for order, end, formatted in sorted(messages, key=lambda m: m[0])]
    finals = FinalTurnFilter(format_turns)
    published: list[Turn] = []
    for turn in turns:
        published.extend(finals.feed_all(turn))
    held = finals.flush()
    if held is not None:
        published.append(held)
    orders = [t.turn_order for t in published]
    assert orders == sorted(set(orders))
    assert set(orders) == {t.turn_order for t in turns if t.end_of_turn}
    for final in published:
        ends = [t for t in turns if t.turn_order == final.turn_order and t.end_of_turn]
        formatted = [t for t in ends if t.turn_is_formatted]
        if not format_turns:
            assert final is ends[0]
        elif formatted:
            # Every message of a turn comes before the next turn's, so its formatted one wins.
            assert final is formatted[0]
        else:
            assert final is ends[-1]
