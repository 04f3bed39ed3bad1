"""AssemblyAI Universal Streaming v3: parameters, events, errors, a session, the final-turn rule."""

from transcriber.aai.client import StreamingSession
from transcriber.aai.errors import (
    ErrorKind,
    ProtocolError,
    StreamingError,
    classify_close,
    classify_http_status,
)
from transcriber.aai.events import (
    Begin,
    Event,
    ServerError,
    SpeechStarted,
    Termination,
    Turn,
    Word,
    parse_message,
)
from transcriber.aai.params import StreamingParams, build_url
from transcriber.aai.turns import FinalTurnFilter

__all__ = [
    "Begin",
    "ErrorKind",
    "Event",
    "FinalTurnFilter",
    "ProtocolError",
    "ServerError",
    "SpeechStarted",
    "StreamingError",
    "StreamingParams",
    "StreamingSession",
    "Termination",
    "Turn",
    "Word",
    "build_url",
    "classify_close",
    "classify_http_status",
    "parse_message",
]
