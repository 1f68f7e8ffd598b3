"""Reading uploads: a streaming multipart reader with byte limits, a read timeout and a
process-wide byte budget; image validation; decoding.

The body is parsed chunk by chunk as it arrives, so an upload over the limit is refused (413)
as soon as the limit is crossed; it is never buffered whole first. Images are sniffed and their
header checked (format, pixel count, side lengths, aspect ratio) before anything is decoded, so a
decompression bomb costs a header parse, not gigabytes of RAM.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Callable, Iterator

import anyio
import numpy as np
import torch
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request

from model.orientation import HEADING_WITHIN_DEG
from model.preprocess import ImageDecodeError, exif_camera, exif_gps, image_uint8, upright_size, xmp_panorama_heading
from model.views import UnreadableView, place_photo, place_view, view_geometry

from .engine import Overloaded
from .schemas import ViewInfo
from .settings import Settings


class UploadError(HTTPException):
    """A client error with an HTTP status and a stable code; rendered as ErrorResponse."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(status, detail, headers)
        self.code = code


def _too_large(detail: str) -> UploadError:
    return UploadError(413, "upload_too_large", detail, {"Connection": "close"})


def invalid(where: str, name: str, kind: str, msg: str, value: object = None) -> RequestValidationError:
    """FastAPI's usual 422, for a parameter (``where``: body, query) that the service checks itself."""
    return RequestValidationError([{"type": kind, "loc": (where, name), "msg": msg, "input": value}])


class UploadBudget:
    """Bytes of upload held in memory by the requests in progress, process-wide. A request whose
    body would take it over ``limit`` is refused (503, retry) instead of letting a few large bodies
    grow the process without bound. Used from the event loop only."""

    def __init__(self, limit: int, on_refused: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.used = 0
        self.on_refused = on_refused  # (a metric)

    @contextlib.contextmanager
    def reservation(self) -> Iterator[Callable[[int], None]]:
        """``take(n)`` for each chunk a request reads; all it took is given back on exit."""
        held = 0

        def take(n: int) -> None:
            nonlocal held
            if self.used + n > self.limit:
                self.on_refused()
                raise Overloaded(f"{self.used} bytes of uploads in progress (limit {self.limit})")
            self.used += n
            held += n

        try:
            yield take
        finally:
            self.used -= held


@dataclass
class UploadedFile:
    index: int
    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def label(self) -> str:
        return f"image {self.index}" + (f" ({self.filename})" if self.filename else "")


class _FileCollector:
    """python-multipart's callbacks, keeping the parts named one of ``field_names`` as files."""

    def __init__(self, field_names: tuple[str, ...], max_files: int, max_file_bytes: int) -> None:
        self.field_names, self.max_files, self.max_file_bytes = field_names, max_files, max_file_bytes
        self.files: list[UploadedFile] = []
        self.headers: dict[str, str] = {}
        self.header = (bytearray(), bytearray())  # the name and value being read
        self.kept: UploadedFile | None = None  # the file part being read; None: a part not kept
        self.buffer = bytearray()
        self.ended = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self.headers.clear,
                "on_header_field": lambda data, start, end: self.header[0].extend(data[start:end]),
                "on_header_value": lambda data, start, end: self.header[1].extend(data[start:end]),
                "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data, "on_part_end": self._part_end, "on_end": self._end}

    def _header_end(self) -> None:
        name, value = (bytes(h).decode("latin-1").strip() for h in self.header)
        self.headers[name.lower()] = value
        self.header = (bytearray(), bytearray())

    def _headers_finished(self) -> None:
        _, disposition = parse_options_header(self.headers.get("content-disposition"))
        name, filename = disposition.get(b"name"), disposition.get(b"filename")
        self.kept, self.buffer = None, bytearray()
        if name is None or name.decode("utf-8", "replace") not in self.field_names:
            return
        if len(self.files) >= self.max_files:
            raise UploadError(413, "too_many_images", f"at most {self.max_files} image(s) per request",
                              {"Connection": "close"})
        raw_type = self.headers.get("content-type")
        self.kept = UploadedFile(len(self.files), filename.decode("utf-8", "replace") if filename is not None else None,
                                 parse_options_header(raw_type)[0].decode("latin-1") if raw_type else None, b"")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.kept is None:
            return
        if len(self.buffer) + (end - start) > self.max_file_bytes:
            raise _too_large(f"image exceeds the limit of {self.max_file_bytes} bytes")
        self.buffer.extend(data[start:end])

    def _part_end(self) -> None:
        if self.kept is not None:
            self.kept.data = bytes(self.buffer)
            self.files.append(self.kept)
            self.kept = None

    def _end(self) -> None:
        self.ended = True


def _boundary(request: Request, field_name: str, max_body_bytes: int) -> bytes:
    """The multipart boundary of a request whose headers promise an acceptable body."""
    content_type = request.headers.get("content-type")
    declared = request.headers.get("content-length")
    if not content_type:
        if declared in (None, "0"):
            raise invalid("body", field_name, "missing", "Field required")
        raise UploadError(415, "unsupported_media_type", "expected a multipart/form-data body")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise UploadError(415, "unsupported_media_type",
                          f"expected multipart/form-data, got {ctype.decode('latin-1') or 'nothing'}")
    if not params.get(b"boundary"):
        raise UploadError(400, "bad_multipart", "multipart/form-data without a boundary")
    if declared is not None:
        try:
            declared_len = int(declared)
        except ValueError:
            raise UploadError(400, "bad_request", "invalid Content-Length") from None
        if declared_len > max_body_bytes:
            raise _too_large(f"request body of {declared_len} bytes exceeds the limit of {max_body_bytes}")
    return params[b"boundary"]


async def read_files(request: Request, *, field_names: tuple[str, ...], max_files: int, max_file_bytes: int,
                     max_body_bytes: int, read_timeout_s: float, take: Callable[[int], None]) -> list[UploadedFile]:
    """Stream a multipart/form-data body and return the parts named one of ``field_names``.

    Other form fields are read and discarded (they still count towards ``max_body_bytes``). Each
    chunk is ``take``n from the upload budget; a client that sends nothing for ``read_timeout_s``
    gets 408.
    """
    boundary = _boundary(request, field_names[0], max_body_bytes)
    collector = _FileCollector(field_names, max_files, max_file_bytes)
    received = 0
    try:
        parser = MultipartParser(boundary, collector.callbacks(), max_header_count=16, max_header_size=8 * 1024)
        more = True
        while more:
            try:
                with anyio.fail_after(read_timeout_s):
                    message = await request.receive()
            except TimeoutError:
                raise UploadError(408, "request_timeout", f"no upload data for {read_timeout_s:g} s",
                                  {"Connection": "close"}) from None
            if message["type"] == "http.disconnect":
                raise UploadError(499, "client_disconnected", "client went away during upload")  # as when queued
            chunk, more = message.get("body", b""), message.get("more_body", False)
            received += len(chunk)
            if received > max_body_bytes:
                raise _too_large(f"request body exceeds the limit of {max_body_bytes} bytes")
            if chunk:
                take(len(chunk))
                parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:  # (MultipartParseError is one)
        raise UploadError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
    if received == 0 or (collector.ended and not collector.files):
        raise invalid("body", field_names[0], "missing", "Field required")
    if not collector.ended:
        raise UploadError(400, "bad_multipart", "multipart body ended before its final boundary")
    return collector.files


# --- image checks ------------------------------------------------------------------------------

_UNTYPED = {None, "", "application/octet-stream"}  # declared types accepted besides image/*
_SUPPORTED = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: a phone's JPEG with extra frames (the first is read)


@dataclass
class CheckedImage:
    """An upload whose header passed `check_image`, opened once: its header read, its pixels not yet."""

    upload: UploadedFile
    image: Image.Image | None  # None once decoded
    width: int  # upright: after its EXIF orientation
    height: int
    exif_fov: float | None = None
    exif_heading: float | None = None
    exif_gps: tuple[float, float] | None = None
    xmp_heading: float | None = None  # a Street View style panorama's GPano:PoseHeadingDegrees


def check_image(upload: UploadedFile, limits: Settings) -> CheckedImage:
    """Validate type and header of an uploaded image without decoding its pixels, and read its EXIF
    camera and position. Raises UploadError with a precise reason."""
    label = upload.label
    data = upload.data
    if not data:
        raise UploadError(400, "empty_upload", f"{label} is empty")
    if upload.content_type not in _UNTYPED and not upload.content_type.startswith("image/"):
        raise UploadError(415, "unsupported_media_type",
                          f"{label} has type {upload.content_type}; send JPEG, PNG or WebP")
    if data[4:8] == b"ftyp":  # HEIF (a phone's HEIC photo) or AVIF: named, as Pillow reads neither
        raise UploadError(415, "unsupported_media_type", f"{label} is HEIF/AVIF; send JPEG, PNG or WebP")
    try:
        img = Image.open(io.BytesIO(data))  # the header only
    except Image.DecompressionBombError as exc:
        raise UploadError(413, "too_many_pixels", f"{label}: {exc}") from None
    except Exception as exc:  # PIL raises many types for garbage headers
        reason = "" if isinstance(exc, UnidentifiedImageError) else f": {exc}"  # its text: "<_io.BytesIO at 0x..>"
        raise UploadError(400, "not_an_image", f"{label} is not an image (JPEG, PNG or WebP){reason}") from None
    if img.format not in _SUPPORTED:
        raise UploadError(415, "unsupported_media_type", f"{label} is {img.format}; send JPEG, PNG or WebP")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise UploadError(413, "too_many_pixels", f"{label} is {width}x{height} = {width * height} pixels; "
                          f"the limit is {limits.max_pixels}")
    if min(width, height) < limits.min_image_side:
        raise UploadError(400, "bad_dimensions",
                          f"{label} is {width}x{height}; each side must be at least {limits.min_image_side} pixels")
    ratio = max(width / height, height / width)
    if ratio > limits.max_aspect_ratio:
        raise UploadError(400, "bad_dimensions",
                          f"{label} is {width}x{height} (aspect ratio {ratio:.1f}): not a street-level view; "
                          f"photos and panoramas are at most {limits.max_aspect_ratio:g}:1")
    try:
        return CheckedImage(upload, img, *upright_size(img), *exif_camera(img, label), exif_gps(img),
                            xmp_panorama_heading(img))
    except (ImageDecodeError, OSError, SyntaxError, ValueError):  # broken EXIF: read as if it had none
        return CheckedImage(upload, img, *img.size)


@dataclass(frozen=True)
class ViewParams:
    """What the request says about its images (query parameters); EXIF and shape fill the rest."""

    fov_deg: float | None = None
    heading_deg: float | None = None
    projection: str | None = None
    tilt: tuple[float, float] | None = None  # a photo's camera pitch, roll (degrees); None: estimated from a photo
    near: tuple[float, float] | None = None  # lat, lon: search only within radius_m of it
    radius_m: float | None = None
    near_from_exif: bool = False  # where `near` is not given: the photo's EXIF GPS position, if any
    heading_within_deg: float = HEADING_WITHIN_DEG  # how far off a given heading may be (180: searched all round)


def view_spec(image: CheckedImage, params: ViewParams) -> ViewInfo:
    """The field of view, projection, heading and tilt of an upload that passed `check_image`: the
    request's parameters first, then the image's XMP (GPano:PoseHeadingDegrees) and EXIF
    (FocalLengthIn35mmFilm, GPSImgDirection), then its shape (`model.views.view_geometry`).
    Without any: 422 naming the parameter to send.
    A heading of None: the view is placed centred on north and its heading is searched."""
    try:
        fov, fov_source, projection = view_geometry(
            image.width, image.height, fov_deg=params.fov_deg, projection=params.projection, exif_fov=image.exif_fov,
            tilted=params.tilt not in (None, (0.0, 0.0)), name=image.upload.label)
    except UnreadableView as exc:
        raise UploadError(422, exc.reason, str(exc)) from None
    given = ((params.heading_deg, "parameter"), (image.xmp_heading, "xmp"), (image.exif_heading, "exif"))
    heading, heading_source = next(((h, source) for h, source in given if h is not None), (None, None))
    pitch, roll = params.tilt or (0.0, 0.0)  # a photo's is estimated where it is decoded (decode_uploads)
    return ViewInfo(fov_deg=fov, projection=projection, fov_source=fov_source, heading_deg=heading,
                    heading_source=heading_source, pitch_deg=pitch, roll_deg=roll,
                    heading_within_deg=None if heading is None else params.heading_within_deg,
                    tilt_source="parameter" if params.tilt is not None and projection == "perspective" else None)


def decode_uploads(images: list[CheckedImage], specs: list[ViewInfo], max_pixels: int,
                   config) -> tuple[torch.Tensor, np.ndarray]:
    """Images that passed `check_image` -> ([n, 3, H, W] uint8 in the ground branch's panorama frame,
    [n, W] bool: the pixel columns each covers) (an encoder thread calls this right before its
    forward); UploadError names the first upload whose pixel data is damaged."""
    views, seen = [], []
    for image, spec in zip(images, specs):
        try:
            name = f"image {image.upload.index}"
            if spec.projection == "perspective" and spec.tilt_source is None:  # the tilt was not sent
                view, covered, (spec.pitch_deg, spec.roll_deg) = place_photo(
                    image.image, config, fov_deg=spec.fov_deg, heading_deg=spec.heading_deg, name=name,
                    max_pixels=max_pixels)
                spec.tilt_source = "estimated"
            else:
                view, covered = place_view(image.image, config, fov_deg=spec.fov_deg, heading_deg=spec.heading_deg,
                                           projection=spec.projection, pitch_deg=spec.pitch_deg,
                                           roll_deg=spec.roll_deg, name=name, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise UploadError(400, "undecodable_image", str(exc)) from None
        finally:
            image.image, image.upload.data = None, b""  # the bytes are no longer needed; let them go early
        views.append(image_uint8(view))
        seen.append(covered)
    return torch.stack(views), np.stack(seen)
