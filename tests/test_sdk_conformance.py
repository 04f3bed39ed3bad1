"""The double against AssemblyAI's own Python SDK (assemblyai 1.8.2, streaming v3).

Route: the SDK takes ``api_host="ws://HOST:PORT"`` as is (``_build_uri`` keeps a ws:// or wss://
prefix and appends ``/v3/ws``), so its real client runs against the double with no patching.
On top of that, every message the double sent, in both turn behaviours and on every error
path, is validated against the SDK's pydantic event models.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from assemblyai.streaming.v3 import (
    BeginEvent,
    SpeechStartedEvent,
    StreamingClient,
    StreamingClientOptions,
    StreamingError,
    StreamingEvents,
    StreamingParameters,
    StreamingSessionParameters,
    TerminationEvent,
    TurnEvent,
)
from assemblyai.streaming.v3.models import ErrorEvent
from pydantic import BaseModel

from tests.double import DoubleConfig, DoubleServer, SessionRecord
from tests.support.speech import compose, digits_phrase

# websockets 17 deprecates the SDK's way of calling its sync connect(); not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

KEY = "sdk-key"
MODELS: dict[str, type[BaseModel]] = {
    "Begin": BeginEvent, "Turn": TurnEvent, "Termination": TerminationEvent,
    "SpeechStarted": SpeechStartedEvent, "Error": ErrorEvent,
}


@pytest.fixture
def double(request: pytest.FixtureRequest) -> Iterator[DoubleServer]:
    overrides = getattr(request, "param", {})
    server = DoubleServer(DoubleConfig(api_keys=(KEY,), enforce_pacing=False, **overrides))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def audio_chunks() -> list[bytes]:
    samples = compose(0.3, digits_phrase([4, 7, 2, 1]), 0.8, digits_phrase([9, 0, 3, 8]), 0.8)
    data = np.concatenate([samples, np.zeros(-samples.size % 800, "<i2")]).tobytes()
    return [data[i:i + 1600] for i in range(0, len(data), 1600)]


class Recorder:
    def __init__(self, client: StreamingClient) -> None:
        self.events: list[tuple[str, Any]] = []
        self.finals = 0
        self.two_finals = threading.Event()
        self.error = threading.Event()
        for kind in StreamingEvents:
            client.on(kind, self._handler(kind.name))

    def _handler(self, name: str) -> Any:
        def handle(client: StreamingClient, event: Any) -> None:
            self.events.append((name, event))
            if name == "Turn" and event.end_of_turn and event.turn_is_formatted:
                self.finals += 1
                if self.finals >= 2:
                    self.two_finals.set()
            if name == "Error":
                self.error.set()
        return handle

    def of(self, name: str) -> list[Any]:
        return [event for kind, event in self.events if kind == name]


def sdk_client(double: DoubleServer, key: str = KEY) -> tuple[StreamingClient, Recorder]:
    client = StreamingClient(StreamingClientOptions(api_host=f"ws://127.0.0.1:{double.port}",
                                                    api_key=key, terminate_timeout=5.0))
    return client, Recorder(client)


def assert_valid_for_sdk(record: SessionRecord) -> None:
    for message in record.sent:
        model = MODELS[message["type"]]
        model.model_validate(message)
        if message["type"] != "Begin":      # Begin.expires_at is a datetime: lax only
            model.model_validate(message, strict=True)


@pytest.mark.parametrize(("double", "model"), [
    ({}, "u3-rt-pro"),
    ({"second_formatted_final": True}, "universal-streaming-english"),
], indirect=["double"])
def test_the_sdk_client_runs_a_whole_session_against_the_double(double: DoubleServer,
                                                                 model: str) -> None:
    client, seen = sdk_client(double)
    client.connect(StreamingParameters(sample_rate=16000, speech_model=model, format_turns=True))
    client.keep_alive()
    client.set_params(StreamingSessionParameters(max_turn_silence=600))
    client.stream(audio_chunks())
    assert seen.two_finals.wait(15), seen.events
    client.force_endpoint()
    client.disconnect(terminate=True)

    assert seen.of("Error") == []
    assert len(seen.of("Begin")) == 1 and len(seen.of("Termination")) == 1
    finals = [t for t in seen.of("Turn") if t.end_of_turn and t.turn_is_formatted]
    assert [t.transcript for t in finals] == ["Four seven two one.", "Nine zero three eight."]
    assert any(not t.end_of_turn for t in seen.of("Turn"))
    assert bool(seen.of("SpeechStarted")) == (model == "u3-rt-pro")
    if model != "u3-rt-pro":
        unformatted = [t for t in seen.of("Turn") if t.end_of_turn and not t.turn_is_formatted]
        assert [t.turn_order for t in unformatted] == [0, 1]

    record = double.wait_for_session(0, closed=True)
    assert record.params["format_turns"] == "True"          # the SDK's spelling is accepted
    assert record.authorization == KEY
    assert [m["type"] for m in record.control] == \
        ["KeepAlive", "UpdateConfiguration", "ForceEndpoint", "Terminate"]
    assert record.close_code == 1000
    assert_valid_for_sdk(record)


def test_the_sdk_reports_a_server_error_with_its_code(double: DoubleServer) -> None:
    client, seen = sdk_client(double)
    client.connect(StreamingParameters(sample_rate=16000, speech_model="u3-rt-pro"))
    session_id = double.wait_for_session(0).session_id
    double.fail(session_id, 3005, "Session Cancelled: An error occurred")
    assert seen.error.wait(5)
    client.disconnect()
    errors = seen.of("Error")
    assert len(errors) == 1 and isinstance(errors[0], StreamingError)
    assert (errors[0].code, str(errors[0])) == (3005, "Session Cancelled: An error occurred")
    assert_valid_for_sdk(double.wait_for_session(0, closed=True))


def test_the_sdk_reports_a_refused_key(double: DoubleServer) -> None:
    client, seen = sdk_client(double, key="not-the-key")
    client.connect(StreamingParameters(sample_rate=16000, speech_model="u3-rt-pro"))
    assert seen.error.wait(5)
    client.disconnect()
    assert [e.code for e in seen.of("Error")] == [1008]
    assert_valid_for_sdk(double.records()[0])


@pytest.mark.parametrize("double", [{"max_session_s": 0.5}], indirect=True)
def test_expiry_reaches_the_sdk_as_error_3008(double: DoubleServer) -> None:
    client, seen = sdk_client(double)
    client.connect(StreamingParameters(sample_rate=16000, speech_model="u3-rt-pro"))
    assert seen.error.wait(5)
    client.disconnect()
    assert [e.code for e in seen.of("Error")] == [3008]
    assert_valid_for_sdk(double.wait_for_session(0, closed=True))


@pytest.mark.parametrize("double", [{"mode": "universal-streaming-english"}], indirect=True)
def test_unformatted_universal_turns_fit_the_sdk_models(double: DoubleServer) -> None:
    client, seen = sdk_client(double)
    client.connect(StreamingParameters(
        sample_rate=16000, speech_model="universal-streaming-english", format_turns=False))
    client.stream(audio_chunks())
    client.disconnect(terminate=True)
    turns = [t for t in seen.of("Turn") if t.end_of_turn]
    assert [t.transcript for t in turns] == ["four seven two one", "nine zero three eight"]
    assert_valid_for_sdk(double.wait_for_session(0, closed=True))
