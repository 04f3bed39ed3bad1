"""Real parts for the tests: redis-server, PulseAudio, espeak-ng speech, tool checks."""
