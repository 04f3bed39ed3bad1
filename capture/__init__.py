"""edgescribe capture: a microphone or a WAV file, published as 50 ms frames to a Redis stream.

The audio stream's format is owned here (``capture.contract``); the transcriber imports it.
"""
