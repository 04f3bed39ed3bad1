"""The microphone as a capture source: PyAudio in callback mode, converted to 16 kHz mono.

The PortAudio callback only converts (libsoxr, microseconds) and hands frames to the FrameBuffer;
it never touches the network. Input overflows are counted as dropped frames. If the device stops
delivering, the stream is reopened (supervised, with backoff), and the gap is counted as well.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from capture.common.errors import ConfigError
from capture.common.supervise import Backoff, supervise
from capture.contract import CHANNELS, FRAME_SAMPLES, SAMPLE_RATE_HZ
from capture.convert import PcmConverter
from capture.framing import Clock, Framer
from capture.metrics import DROP_DEVICE, DROP_OVERFLOW

log = logging.getLogger(__name__)

PyAudioFactory = Callable[[], Any]

PA_INT16 = 8  # pyaudio.paInt16
PA_INPUT_OVERFLOW = 2  # pyaudio.paInputOverflow
PA_CONTINUE = 0  # pyaudio.paContinue
_FALLBACK_RATES = (48_000, 44_100, 32_000, 22_050, 96_000)
_FIRST_AUDIO_TIMEOUT_S = 10.0  # PulseAudio's first callback comes 1-2 s after open
_STALL_TIMEOUT_S = 5.0
_NO_DEVICE_HINT = "is a sound card, or a PulseAudio server (PULSE_SERVER), available here?"


class DeviceError(RuntimeError):
    """The input device failed or vanished after start; the source reopens it."""


def default_pyaudio() -> Any:
    import pyaudio  # lazily: PyAudio() probes ALSA/JACK, which processes without a mic skip

    return pyaudio.PyAudio()


@contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[None]:
    """Silence C-level stderr: PortAudio's probing prints dozens of harmless ALSA/JACK lines.

    Only for the moments before other threads log (device lookup at start).
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    max_channels: int
    default_rate: int


def list_input_devices(pa: Any) -> list[InputDevice]:
    devices = []
    for index in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(index)
        if int(info.get("maxInputChannels", 0)) > 0:
            devices.append(InputDevice(index, str(info["name"]), int(info["maxInputChannels"]),
                                       int(info.get("defaultSampleRate", 0))))
    return devices


def format_device_table(devices: list[InputDevice]) -> str:
    if not devices:
        return f"no input devices ({_NO_DEVICE_HINT})"
    lines = [f"{'index':>5}  {'channels':>8}  {'rate':>6}  name"]
    lines += [f"{d.index:>5}  {d.max_channels:>8}  {d.default_rate:>6}  {d.name}" for d in devices]
    return "\n".join(lines)


def resolve_device(pa: Any, selector: str | None, setting: str) -> InputDevice:
    """The input device an index or a case-insensitive name substring selects (None: default)."""
    devices = list_input_devices(pa)
    if not devices:
        raise ConfigError(setting, f"no input devices found: {_NO_DEVICE_HINT}")
    if selector is None:
        try:
            default_index = int(pa.get_default_input_device_info()["index"])
        except (OSError, KeyError, ValueError):
            return devices[0]
        return next((d for d in devices if d.index == default_index), devices[0])
    if selector.isdigit():
        match = [d for d in devices if d.index == int(selector)]
    else:
        wanted = selector.casefold()
        match = [d for d in devices if d.name.casefold() == wanted]
        match = match or [d for d in devices if wanted in d.name.casefold()]
    if not match:
        raise ConfigError(setting, f"no input device matches {selector!r} (see --list-devices)")
    if len(match) > 1:
        names = ", ".join(f"{d.index}: {d.name}" for d in match)
        raise ConfigError(setting, f"{selector!r} matches several input devices ({names}); "
                                   "give an index")
    return match[0]


def choose_format(pa: Any, device: InputDevice) -> tuple[int, int]:
    """(rate, channels) to open: 16 kHz mono when supported, else the closest 16-bit format."""
    rates = [SAMPLE_RATE_HZ, device.default_rate, *_FALLBACK_RATES]
    channels = (CHANNELS, 2) if device.max_channels >= 2 else (CHANNELS,)
    for rate in dict.fromkeys(r for r in rates if r > 0):
        for count in channels:
            try:
                if pa.is_format_supported(rate, input_device=device.index, input_channels=count,
                                          input_format=PA_INT16):
                    return rate, count
            except ValueError:
                continue
    msg = f"input device {device.name!r} supports no 16-bit format we can use"
    raise DeviceError(msg)


class MicSource:
    """A PyAudio input device; ``open()`` at start (config errors), ``run()`` until stopped."""

    def __init__(self, selector: str | None, *, setting: str, pa_factory: PyAudioFactory,
                 clock: Clock, quiet: bool = True) -> None:
        self._selector = selector
        self._setting = setting
        self._pa_factory = pa_factory
        self._clock = clock
        self._quiet = quiet
        self._pa: Any = None
        self._device: InputDevice | None = None
        self._rate = SAMPLE_RATE_HZ
        self._channels = CHANNELS
        self._converter: PcmConverter | None = None
        self._framer: Framer | None = None
        self._reopened = False
        self._last_callback: float | None = None
        self._callback_failed = False
        self.description = "mic"

    def open(self) -> None:
        """Find the device and a format; a ConfigError names what is wrong."""
        with quiet_stderr(self._quiet):
            try:
                self._pa = self._pa_factory()
            except OSError as exc:
                raise ConfigError(self._setting, f"cannot start PortAudio: {exc}") from None
            try:
                self._select()
            except DeviceError as exc:
                self._terminate()
                raise ConfigError(self._setting, str(exc)) from None
            except ConfigError:
                self._terminate()
                raise
        self._log_choice()  # not while stderr is silenced

    def run(self, framer: Framer, stop: threading.Event) -> None:
        self._framer = framer
        try:
            supervise("microphone", lambda: self._session(stop), stop,
                      retry_on=(OSError, DeviceError), backoff=Backoff(initial_s=0.5, cap_s=10.0),
                      on_error=lambda _exc: self._terminate())
        finally:
            self._terminate()

    def _select(self) -> None:
        device = resolve_device(self._pa, self._selector, self._setting)
        self._rate, self._channels = choose_format(self._pa, device)
        self._device = device
        self._converter = PcmConverter(self._rate, self._channels, 2)
        self.description = f"mic:{device.name}"[:80]

    def _log_choice(self) -> None:
        if self._device is not None and self._converter is not None:
            log.info("input device %d %r: %d Hz, %d ch%s", self._device.index, self._device.name,
                     self._rate, self._channels, "" if self._converter.passthrough else
                     " (converted to 16 kHz mono with soxr)")

    def _session(self, stop: threading.Event) -> None:
        """Open the stream and watch it until ``stop``; raise DeviceError when it goes quiet."""
        if self._pa is None:  # reopening after a failure: rescan, the device may have moved
            self._pa = self._pa_factory()
            try:
                self._select()
            except ConfigError as exc:
                raise DeviceError(exc.problem) from None
            self._log_choice()
        device = self._device
        if device is None:
            msg = "no input device selected"
            raise DeviceError(msg)
        self._last_callback = None
        stream = self._pa.open(
            format=PA_INT16, channels=self._channels, rate=self._rate, input=True,
            input_device_index=device.index,
            frames_per_buffer=FRAME_SAMPLES * self._rate // SAMPLE_RATE_HZ,
            stream_callback=self._callback, start=True)
        opened = self._clock.monotonic()
        try:
            while not stop.wait(0.2):
                now = self._clock.monotonic()
                problem = self._stream_problem(stream, now - opened, now)
                if problem:
                    raise DeviceError(problem)
        finally:
            self._reopened = True
            try:
                stream.stop_stream()
                stream.close()
            except OSError as exc:
                log.debug("closing the input stream: %s", exc)

    def _stream_problem(self, stream: Any, open_s: float, now: float) -> str | None:
        if not stream.is_active():
            return "the input stream stopped"
        last = self._last_callback
        if last is None and open_s > _FIRST_AUDIO_TIMEOUT_S:
            return f"no audio {_FIRST_AUDIO_TIMEOUT_S:.0f} s after opening"
        if last is not None and now - last > _STALL_TIMEOUT_S:
            return f"no audio for {_STALL_TIMEOUT_S:.0f} s"
        return None

    def _callback(self, in_data: bytes | None, frame_count: int, _time_info: Any,
                  status: int) -> tuple[None, int]:
        # PortAudio's thread: never block, never raise (an exception would abort the stream).
        try:
            now = self._clock.monotonic()
            chunk_start = now - frame_count / self._rate
            framer, converter = self._framer, self._converter
            if framer is None or converter is None:
                return None, PA_CONTINUE
            if not framer.started:
                framer.start(chunk_start)
            elif self._last_callback is None and self._reopened:
                converter.reset()
                framer.discontinuity(chunk_start, DROP_DEVICE)
            elif status & PA_INPUT_OVERFLOW:
                converter.reset()
                framer.discontinuity(chunk_start, DROP_OVERFLOW)
            self._last_callback = now
            if in_data:
                framer.write(converter.convert(in_data))
        except Exception:
            if not self._callback_failed:  # once: this runs 20 times a second
                self._callback_failed = True
                log.exception("unexpected error in the audio callback (logged once)")
        return None, PA_CONTINUE

    def _terminate(self) -> None:
        pa, self._pa = self._pa, None
        if pa is not None:
            try:
                pa.terminate()
            except OSError as exc:
                log.debug("terminating PyAudio: %s", exc)
