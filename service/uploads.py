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
from dataclasses import dataclass, field
from typing import Callable, Iterator

import anyio
import numpy as np
import torch
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from model.preprocess import ImageDecodeError, exif_camera, image_uint8
from model.views import place_view


class UploadError(Exception):
    """A client error with an HTTP status and a stable code; rendered as ErrorResponse."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


class MissingUpload(Exception):
    """The required file field is absent; rendered as FastAPI's usual 422 validation error."""

    def __init__(self, field_name: str) -> None:
        super().__init__(field_name)
        self.field_name = field_name


class UploadBudget:
    """Bytes of upload held in memory by the requests in progress, process-wide. A request whose
    body would take it over ``limit`` is refused (503, retry) instead of letting a few large bodies
    grow the process without bound. Used from the event loop only."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.used = 0
        self._retry = {"Retry-After": str(retry_after_s)}

    @contextlib.contextmanager
    def reservation(self) -> Iterator[Callable[[int], None]]:
        """``take(n)`` for each chunk a request reads; all it took is given back on exit."""
        held = 0

        def take(n: int) -> None:
            nonlocal held
            if self.used + n > self.limit:
                raise UploadError(503, "overloaded", f"server busy: {self.used} bytes of uploads in progress "
                                  f"(limit {self.limit}); retry later", self._retry)
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


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    content_type: str | None = None
    buffer: bytearray = field(default_factory=bytearray)
    keep: bool = False


class _FileCollector:
    """python-multipart's callbacks, keeping the parts named one of ``field_names`` as files."""

    EVENTS = ("part_begin", "header_field", "header_value", "header_end", "headers_finished", "part_data",
              "part_end", "end")

    def __init__(self, field_names: tuple[str, ...], max_files: int, max_file_bytes: int) -> None:
        self.field_names, self.max_files, self.max_file_bytes = field_names, max_files, max_file_bytes
        self.files: list[UploadedFile] = []
        self.part = _Part()
        self.header = (bytearray(), bytearray())
        self.ended = False

    def callbacks(self) -> dict:
        return {f"on_{event}": getattr(self, event) for event in self.EVENTS}

    def part_begin(self) -> None:
        self.part = _Part()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header[0].extend(data[start:end])

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.header[1].extend(data[start:end])

    def header_end(self) -> None:
        name, value = (bytes(h).decode("latin-1").strip() for h in self.header)
        self.part.headers[name.lower()] = value
        self.header = (bytearray(), bytearray())

    def headers_finished(self) -> None:
        part = self.part
        _, disposition = parse_options_header(part.headers.get("content-disposition"))
        name, filename = disposition.get(b"name"), disposition.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        raw_type = part.headers.get("content-type")
        part.content_type = parse_options_header(raw_type)[0].decode("latin-1") if raw_type else None
        part.keep = name is not None and name.decode("utf-8", "replace") in self.field_names
        if part.keep and len(self.files) >= self.max_files:
            raise UploadError(413, "too_many_images", f"at most {self.max_files} image(s) per request",
                              {"Connection": "close"})

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if not self.part.keep:
            return
        if len(self.part.buffer) + (end - start) > self.max_file_bytes:
            raise _too_large(f"image exceeds the limit of {self.max_file_bytes} bytes")
        self.part.buffer.extend(data[start:end])

    def part_end(self) -> None:
        if self.part.keep:
            part = self.part
            self.files.append(UploadedFile(len(self.files), part.filename, part.content_type, bytes(part.buffer)))

    def end(self) -> None:
        self.ended = True


def _too_large(detail: str) -> UploadError:
    return UploadError(413, "upload_too_large", detail, {"Connection": "close"})


async def read_files(
    request: Request,
    *,
    field_names: tuple[str, ...],
    max_files: int,
    max_file_bytes: int,
    max_body_bytes: int,
    read_timeout_s: float,
    take: Callable[[int], None],
) -> list[UploadedFile]:
    """Stream a multipart/form-data body and return the parts named one of ``field_names``.

    Other form fields are read and discarded (they still count towards ``max_body_bytes``). Each
    chunk is ``take``n from the upload budget; a client that sends nothing for ``read_timeout_s``
    gets 408.
    """
    content_type = request.headers.get("content-type")
    declared = request.headers.get("content-length")
    if not content_type:
        if declared in (None, "0"):
            raise MissingUpload(field_names[0])
        raise UploadError(415, "unsupported_media_type", "expected a multipart/form-data body")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise UploadError(
            415, "unsupported_media_type",
            f"expected multipart/form-data, got {ctype.decode('latin-1') or 'nothing'}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "bad_multipart", "multipart/form-data without a boundary")
    if declared is not None:
        try:
            declared_len = int(declared)
        except ValueError:
            raise UploadError(400, "bad_request", "invalid Content-Length") from None
        if declared_len > max_body_bytes:
            raise _too_large(
                f"request body of {declared_len} bytes exceeds the limit of {max_body_bytes}"
            )

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
                raise ClientDisconnect()
            chunk, more = message.get("body", b""), message.get("more_body", False)
            if not chunk:
                continue
            received += len(chunk)
            if received > max_body_bytes:
                raise _too_large(f"request body exceeds the limit of {max_body_bytes} bytes")
            take(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:  # (MultipartParseError is one)
        raise UploadError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        raise UploadError(400, "client_disconnected", "client went away during upload") from None
    if received == 0:
        raise MissingUpload(field_names[0])
    if not collector.ended:
        raise UploadError(400, "bad_multipart", "multipart body ended before its final boundary")
    if not collector.files:
        raise MissingUpload(field_names[0])
    return collector.files


# --- image checks ------------------------------------------------------------------------------

_DECLARED_OK = {
    None, "", "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp",
    "application/octet-stream",
}
_SUPPORTED = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: a phone's JPEG with extra frames (the first is read)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    min_side: int
    max_aspect_ratio: float


def check_image(upload: UploadedFile, limits: ImageLimits) -> tuple[str, int, int]:
    """Validate type and header of an uploaded image without decoding its pixels.

    Returns (format, width, height); raises UploadError with a precise reason otherwise.
    """
    label = _label(upload)
    data = upload.data
    if not data:
        raise UploadError(400, "empty_upload", f"{label} is empty")
    if upload.content_type not in _DECLARED_OK and not upload.content_type.startswith("image/"):
        raise UploadError(
            415, "unsupported_media_type",
            f"{label} has type {upload.content_type}; send JPEG, PNG or WebP",
        )
    if data[4:8] == b"ftyp":  # HEIF (a phone's HEIC photo) or AVIF: named, as Pillow reads neither
        raise UploadError(415, "unsupported_media_type", f"{label} is HEIF/AVIF; send JPEG, PNG or WebP")
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only
            fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError as exc:
        raise UploadError(413, "too_many_pixels", f"{label}: {exc}") from None
    except Exception as exc:  # PIL raises many types for garbage headers
        raise UploadError(400, "not_an_image", f"{label} is not an image (JPEG, PNG or WebP): {exc}") from None
    if fmt not in _SUPPORTED:
        raise UploadError(415, "unsupported_media_type", f"{label} is {fmt}; send JPEG, PNG or WebP")
    if width * height > limits.max_pixels:
        raise UploadError(
            413, "too_many_pixels",
            f"{label} is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_pixels}",
        )
    if min(width, height) < limits.min_side:
        raise UploadError(
            400, "bad_dimensions",
            f"{label} is {width}x{height}; each side must be at least {limits.min_side} pixels",
        )
    ratio = max(width / height, height / width)
    if ratio > limits.max_aspect_ratio:
        raise UploadError(
            400, "bad_dimensions",
            f"{label} is {width}x{height} (aspect ratio {ratio:.1f}): not a street-level view; "
            f"photos and panoramas are at most {limits.max_aspect_ratio:g}:1",
        )
    return fmt, width, height


def _label(upload: UploadedFile) -> str:
    name = f" ({upload.filename})" if upload.filename else ""
    return f"image {upload.index}{name}"


PANORAMA_ASPECT = 3.5  # width/height from which an image without a stated field of view is a 360 panorama
MIN_FOV_DEG = 20.0  # narrower views cover less than one 16-pixel token column of a 256-pixel-wide panorama


@dataclass(frozen=True)
class ViewSpec:
    """How one upload is read (service.schemas.ViewInfo says the same to the client)."""

    fov_deg: float
    projection: str  # model.views.PROJECTIONS
    fov_source: str  # parameter | exif | aspect
    heading_deg: float | None  # where it is placed; None: centred on north, the heading is searched
    heading_source: str | None  # parameter | exif


def view_spec(upload: UploadedFile, width: int, height: int, fov_deg: float | None, heading_deg: float | None,
              projection: str | None) -> ViewSpec:
    """The field of view, projection and heading of an upload that passed `check_image`: the request's
    parameters first, then the photo's EXIF (FocalLengthIn35mmFilm, GPSImgDirection), then its shape
    (a wide image is a 360 degree panorama). Without any: 422 naming the parameter to send."""
    try:
        exif_fov, exif_heading = exif_camera(upload.data, _label(upload))
    except ImageDecodeError:
        exif_fov = exif_heading = None
    if fov_deg is not None:
        fov, fov_source = fov_deg, "parameter"
    elif width >= PANORAMA_ASPECT * height:  # before EXIF: a phone's panorama still names its lens
        fov, fov_source = 360.0, "aspect"
    elif exif_fov is not None:
        fov, fov_source = exif_fov, "exif"
    else:
        raise UploadError(
            422, "fov_unknown",
            f"{_label(upload)} is {width}x{height} (aspect {width / height:.2f}): not a 360 degree panorama "
            f"(aspect {PANORAMA_ASPECT:g}:1 or wider) and its EXIF states no focal length; send its horizontal "
            "field of view as the parameter fov_deg (e.g. fov_deg=65 for a phone's main camera)")
    if projection is None:
        projection = "perspective" if fov_source == "exif" or (fov < 360 and width < PANORAMA_ASPECT * height) \
            else "equirectangular"
    if fov < MIN_FOV_DEG or (projection == "perspective" and fov >= 180):
        raise UploadError(
            422, "bad_field_of_view",
            f"{_label(upload)}: a field of view of {fov:g} degrees ({fov_source}) can not be read: a view must span "
            f"at least {MIN_FOV_DEG:g} degrees, a photo (projection=perspective) less than 180; send fov_deg, or "
            "projection=equirectangular for a wider panorama crop")
    heading, heading_source = (heading_deg, "parameter") if heading_deg is not None else \
        (exif_heading, "exif") if exif_heading is not None else (None, None)
    return ViewSpec(fov, projection, fov_source, heading, heading_source)


def decode_uploads(files: list[UploadedFile], specs: list[ViewSpec], limits: ImageLimits,
                   config) -> tuple[torch.Tensor, np.ndarray]:
    """Uploads that passed `check_image` -> ([n, 3, H, W] uint8 in the ground branch's panorama frame,
    [n, W] bool: the pixel columns each covers) (an encoder thread calls this right before its
    forward); UploadError names the first upload whose pixel data is damaged."""
    views, seen = [], []
    for upload, spec in zip(files, specs):
        try:
            view, covered = place_view(upload.data, config, fov_deg=spec.fov_deg, heading_deg=spec.heading_deg,
                                       projection=spec.projection, name=f"image {upload.index}",
                                       max_pixels=limits.max_pixels)
        except ImageDecodeError as exc:
            raise UploadError(400, "undecodable_image", str(exc)) from None
        views.append(image_uint8(view))
        seen.append(covered)
        upload.data = b""  # the bytes are no longer needed; let them go early
    return torch.stack(views), np.stack(seen)
