"""edgescribe transcriber: per-device VAD-gated AssemblyAI v3 sessions, turns to a Redis stream.

The turn and session record formats are owned here (``transcriber.records``); downstream
consumers import them.
"""
