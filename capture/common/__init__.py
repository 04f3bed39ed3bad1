"""Plumbing shared by both services: settings parsing, Redis connections, supervision, logging.

It lives in ``capture`` because the transcriber already depends on ``capture`` for the audio
contract, and a third import package would add nothing but a name.
"""
