"""OpenAI's transcription API (`POST /v1/audio/transcriptions`): no callbacks, no jobs, the transcript
is the answer. b24scribe uploads the recording, waits for the transcript, and stores it as if OpenAI
had posted it to /hooks/stt/openai (whose schema reads `verbose_json` and `diarized_json`).

OpenAI has no channel mode, so a stereo PCM WAV (one speaker per channel) is split into two mono WAV
files, streamed block by block from the downloaded file to temporary ones, and each is transcribed
on its own (`B24SCRIBE_OPENAI_MODEL`, `whisper-1` by default: the model whose `verbose_json` has
segments); the two answers become two parts, `?channel=0` and `?channel=1` with `&parts=2`. A mono
recording, and a stereo one that is not a PCM WAV (an mp3, an A-law or μ-law WAV, which Python's
`wave` cannot split), goes whole to the diarizing model (`B24SCRIBE_OPENAI_DIARIZE_MODEL`,
`gpt-4o-transcribe-diarize`) as `diarized_json`: its speakers map to sides by the first-speaker rule.

Limits and failures: OpenAI takes at most 25 MiB per request, so a file above that is refused before
anything is sent and shown on the call (a split stereo WAV sends each channel, half the size). A 429
waits for its Retry-After, except `insufficient_quota`, which waiting does not cure (shown on the
call). A 5xx or no connection is retried on the schedule. An answer lost after the upload is retried
too: OpenAI keeps no job to look up, so a retry transcribes (and bills) the recording again, the
price of not losing the call's transcript. The wait for an answer is
`B24SCRIBE_OPENAI_TIMEOUT_SECONDS` (600 by default, as OpenAI's own client waits): the transcript is
made while the request is open.
"""

from __future__ import annotations

import tempfile
import wave
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests
from requests_toolbelt import MultipartEncoder

from b24scribe.callbacks import CredentialPlace
from b24scribe.delivery.submit import (
    AnswerLost,
    JobStatus,
    Submission,
    VendorBusy,
    VendorError,
    VendorRejected,
    VendorUnavailable,
    _key_and_api,
    _post,
    classify,
)
from b24scribe.settings import Settings

# OpenAI's limit on a request's body (its 413 names 26214400 bytes: 25 MiB)
MAX_REQUEST_BYTES = 25 * 1024 * 1024
BLOCK_FRAMES = 16 * 1024  # frames read from the stereo file at a time: 64 KiB of 16-bit stereo
WAV_HEADER_BYTES = 44


class OpenAI:
    """OpenAI `POST /v1/audio/transcriptions`, multipart: `file`, `model`, `response_format`
    (`verbose_json` with `timestamp_granularities[]=segment` per channel, `diarized_json` with
    `chunking_strategy=auto` for a whole recording), `language` when B24SCRIBE_OPENAI_LANGUAGE is set
    (else OpenAI detects it), `Authorization: Bearer <key>`. It answers with the transcript
    (`TranscribesAtOnce`); there is never a vendor job to find or to ask about."""

    name = "openai"
    # nothing calls back, so no credential travels anywhere; "header" keeps it out of the URL all the same
    credential: CredentialPlace = "header"
    default_api = "https://api.openai.com"
    fetches_urls = False  # OpenAI takes the file itself, never a URL
    default_model = "whisper-1"  # the model whose verbose_json has segments
    default_diarize_model = "gpt-4o-transcribe-diarize"  # the model that labels speakers (diarized_json)
    default_timeout = 600.0  # seconds: the transcript is made while the request waits

    def _api(self, settings: Settings) -> tuple[str, dict[str, str]]:
        api, key = _key_and_api(settings, self.name, self.default_api)
        return api, {"Authorization": f"Bearer {key}"}

    def transcribe_now(self, http: requests.Session, settings: Settings, submission: Submission) -> list[JobStatus]:
        """One part per channel of a stereo PCM WAV, else one diarized part for the whole recording."""
        assert submission.path is not None, "OpenAI gets the downloaded file (fetches_urls is False)"
        if submission.channels == 2:
            with tempfile.TemporaryDirectory(prefix="b24scribe-openai-") as directory:
                channels = _split_channels(submission.path, Path(directory))
                if channels is not None:
                    return [
                        self._channel(http, settings, path, index, len(channels)) for index, path in enumerate(channels)
                    ]
        return [self._diarized(http, settings, submission)]

    def _channel(self, http: requests.Session, settings: Settings, path: Path, index: int, parts: int) -> JobStatus:
        """One channel's mono WAV as `verbose_json` segments, stored as `?channel=<index>&parts=<parts>`."""
        fields = [
            ("model", settings.vendor_setting(self.name, "model") or self.default_model),
            ("response_format", "verbose_json"),
            ("timestamp_granularities[]", "segment"),
        ]
        body = self._transcribe(http, settings, path, f"channel-{index}.wav", "audio/wav", fields)
        return JobStatus("done", callback=body, query=(("channel", str(index)), ("parts", str(parts))))

    def _diarized(self, http: requests.Session, settings: Settings, submission: Submission) -> JobStatus:
        assert submission.path is not None
        fields = [
            ("model", settings.vendor_setting(self.name, "diarize_model") or self.default_diarize_model),
            ("response_format", "diarized_json"),
            ("chunking_strategy", "auto"),  # required above 30 s of audio
        ]
        filename, media_type = _audio_file(submission.path, submission.content_type)
        return JobStatus(
            "done", callback=self._transcribe(http, settings, submission.path, filename, media_type, fields)
        )

    def _transcribe(
        self,
        http: requests.Session,
        settings: Settings,
        path: Path,
        filename: str,
        media_type: str,
        fields: list[tuple[str, str]],
    ) -> bytes:
        """Upload one file, streamed; the transcript exactly as OpenAI answered it."""
        api, headers = self._api(settings)
        if language := settings.vendor_setting(self.name, "language"):
            fields = [*fields, ("language", language)]
        timeout = self._timeout(settings)
        with path.open("rb") as file:
            encoder = MultipartEncoder(fields=[("file", (filename, file, media_type)), *fields])
            if encoder.len > MAX_REQUEST_BYTES:
                raise VendorRejected(_too_large(path.stat().st_size))
            upload = {**headers, "Content-Type": encoder.content_type, "Content-Length": str(encoder.len)}
            try:
                answer = _post(http, self.name, f"{api}/v1/audio/transcriptions", timeout, headers=upload, data=encoder)
            except AnswerLost as error:
                # no job to look up: the next attempt transcribes the recording again (and is billed again)
                raise VendorUnavailable(f"{error}; OpenAI keeps nothing to look up, so it is sent again") from None
        if answer.status_code != 200:
            raise _refused(answer)
        try:
            transcript = answer.json()
        except ValueError:
            transcript = None
        if not isinstance(transcript, dict):
            raise VendorUnavailable("openai answered HTTP 200 with something that is not a JSON transcript")
        return answer.content

    def _timeout(self, settings: Settings) -> float:
        text = settings.vendor_setting(self.name, "timeout_seconds")
        try:
            seconds = float(text) if text else self.default_timeout
        except ValueError:
            seconds = 0.0
        if not seconds > 0:
            raise VendorRejected(f"B24SCRIBE_OPENAI_TIMEOUT_SECONDS must be a number of seconds, not {text!r}")
        return seconds

    def submit(self, http: requests.Session, settings: Settings, submission: Submission) -> str:
        """Never used: OpenAI answers with the transcript (`transcribe_now`) and has no callbacks."""
        raise VendorRejected("openai answers with the transcript at once; it takes no submission for a callback")

    def find(
        self, http: requests.Session, settings: Settings, metadata: tuple[tuple[str, str], ...], since: float
    ) -> str | None:
        """None: OpenAI keeps no jobs, so there is never an earlier submission to find."""
        return None

    def check(self, http: requests.Session, settings: Settings) -> None:
        """`GET /v1/models`: read-only, free, and refused with a wrong key."""
        api, headers = self._api(settings)
        try:
            answer = http.get(f"{api}/v1/models", headers=headers, timeout=(10.0, settings.vendor_timeout_seconds))
        except requests.RequestException as error:
            raise VendorUnavailable(f"openai could not be reached ({type(error).__name__})") from None
        if answer.status_code != 200:
            raise _refused(answer)


def _split_channels(path: Path, directory: Path) -> list[Path] | None:
    """A stereo PCM WAV as two mono WAV files in `directory` (left, then right), written block by
    block (never the whole recording in memory); None when the file is not a two-channel PCM WAV
    (an mp3; an A-law, μ-law or float WAV, which Python's `wave` does not read; a broken file)."""
    with ExitStack() as stack:
        try:
            reader = stack.enter_context(wave.open(str(path), "rb"))
        except (wave.Error, EOFError, OSError):
            return None
        if reader.getnchannels() != 2:
            return None
        width = reader.getsampwidth()
        one_channel = reader.getnframes() * width + WAV_HEADER_BYTES
        if one_channel > MAX_REQUEST_BYTES:
            raise VendorRejected(_too_large(one_channel, "each channel"))
        paths = [directory / f"channel-{index}.wav" for index in (0, 1)]
        writers = [stack.enter_context(wave.open(str(p), "wb")) for p in paths]  # closing writes the sizes
        for writer in writers:
            writer.setnchannels(1)
            writer.setsampwidth(width)
            writer.setframerate(reader.getframerate())
        while frames := reader.readframes(BLOCK_FRAMES):
            for index, writer in enumerate(writers):
                writer.writeframesraw(_one_channel(frames, index, width))
    return paths


def _one_channel(frames: bytes, channel: int, width: int) -> bytes:
    """Channel 0 or 1 of interleaved stereo frames: each sample's `width` bytes, every other sample."""
    out = bytearray(len(frames) // 2)
    for byte in range(width):
        out[byte::width] = frames[channel * width + byte :: 2 * width]
    return bytes(out)


def _audio_file(path: Path, content_type: str | None) -> tuple[str, str]:
    """The upload's name and type (OpenAI tells the format by the name's extension), by the file's
    first bytes, else its Content-Type (the downloaded file's own name is a temporary `….part`)."""
    with path.open("rb") as file:
        head = file.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "recording.wav", "audio/wav"
    mp3_frame = len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    named = (content_type or "").lower()
    if head[:3] == b"ID3" or mp3_frame or "mpeg" in named or "mp3" in named:
        return "recording.mp3", "audio/mpeg"
    return "recording.wav", "audio/wav"


def _too_large(size: int, what: str = "the recording") -> str:
    return f"{what} is {_mib(size)} MiB: OpenAI takes at most {_mib(MAX_REQUEST_BYTES)} MiB per file"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f}".removesuffix(".0")


def _refused(answer: requests.Response) -> VendorError:
    """OpenAI's error answer as what to do about it, with OpenAI's own message (`{"error": {…}}`)."""
    message, code = _error_of(answer)
    error = classify("openai", answer, message)
    if isinstance(error, VendorBusy) and code == "insufficient_quota":
        # a spent quota is a 429 too, but waiting does not end it: someone must pay or raise the limit
        return VendorRejected(str(error))
    return error


def _error_of(answer: requests.Response) -> tuple[str, str]:
    """The message and code of OpenAI's error body; a wrong key's message is cut before the key it quotes."""
    try:
        body: Any = answer.json()
    except ValueError:
        return "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", ""
    message, code = error.get("message"), error.get("code")
    message = message if isinstance(message, str) else ""
    code = code if isinstance(code, str) else ""
    if code == "invalid_api_key":
        message = message.split(":", 1)[0]
    return " ".join(message.split())[:300], code
