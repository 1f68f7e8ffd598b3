"""Reading uploads: a streaming multipart reader with byte limits, and image validation.

The body is parsed chunk by chunk as it arrives, so an upload over the limit is refused (413)
as soon as the limit is crossed; it is never buffered whole first. Images are sniffed and their
header checked (format, pixel count, side lengths, aspect ratio) before anything is decoded, so a
decompression bomb costs a header parse, not gigabytes of RAM.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request


class UploadError(Exception):
    """A client error with an HTTP status and a stable code; rendered as ErrorResponse."""

    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}

    def __reduce__(self):  # raised in an encoder process, re-raised in the service's
        return type(self), (self.status, self.code, self.detail, self.headers)


class MissingUpload(Exception):
    """The required file field is absent; rendered as FastAPI's usual 422 validation error."""

    def __init__(self, field_name: str) -> None:
        super().__init__(field_name)
        self.field_name = field_name


@dataclass
class UploadedFile:
    index: int
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    buffer: bytearray = field(default_factory=bytearray)
    keep: bool = False


def _too_large(detail: str) -> UploadError:
    return UploadError(413, "upload_too_large", detail, {"Connection": "close"})


async def read_files(
    request: Request,
    *,
    field_names: tuple[str, ...],
    max_files: int,
    max_file_bytes: int,
    max_body_bytes: int,
) -> list[UploadedFile]:
    """Stream a multipart/form-data body and return the parts named one of ``field_names``.

    Other form fields are read and discarded (they still count towards ``max_body_bytes``).
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

    files: list[UploadedFile] = []
    state: dict[str, object] = {"part": None, "field": b"", "value": b"", "ended": False}

    def on_part_begin() -> None:
        state["part"] = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]  # type: ignore[operator]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]  # type: ignore[operator]

    def on_header_end() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        name = bytes(state["field"]).decode("latin-1").strip().lower()  # type: ignore[arg-type]
        part.headers[name] = bytes(state["value"]).decode("latin-1").strip()  # type: ignore[arg-type]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        _, disp = parse_options_header(part.headers.get("content-disposition"))
        name = disp.get(b"name")
        part.name = name.decode("utf-8", "replace") if name is not None else None
        filename = disp.get(b"filename")
        part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        raw_type = part.headers.get("content-type")
        part.content_type = parse_options_header(raw_type)[0].decode("latin-1") if raw_type else None
        part.keep = part.name in field_names
        if part.keep and len(files) >= max_files:
            raise UploadError(
                413, "too_many_images", f"at most {max_files} image(s) per request",
                {"Connection": "close"},
            )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        if not part.keep:
            return
        if len(part.buffer) + (end - start) > max_file_bytes:
            raise _too_large(f"image exceeds the limit of {max_file_bytes} bytes")
        part.buffer += data[start:end]

    def on_part_end() -> None:
        part: _Part = state["part"]  # type: ignore[assignment]
        if part.keep:
            files.append(
                UploadedFile(len(files), part.filename, part.content_type, bytes(part.buffer))
            )
        state["part"] = None

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_end": on_end,
        },
        max_header_count=16,
        max_header_size=8 * 1024,
    )
    received = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            received += len(chunk)
            if received > max_body_bytes:
                raise _too_large(f"request body exceeds the limit of {max_body_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        raise UploadError(400, "client_disconnected", "client went away during upload") from None
    if received == 0:
        raise MissingUpload(field_names[0])
    if not state["ended"]:
        raise UploadError(400, "bad_multipart", "multipart body ended before its final boundary")
    if not files:
        raise MissingUpload(field_names[0])
    return files


# --- image checks ------------------------------------------------------------------------------

_DECLARED_OK = {
    None, "", "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp",
    "application/octet-stream",
}
_SUPPORTED = ("JPEG", "PNG", "WEBP")
_OTHER_IMAGE_MAGIC = {
    b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO", b"%PDF": "PDF", b"8BPS": "PSD", b"\xff\x0a": "JPEG XL",
    b"\x00\x00\x00\x0cJXL ": "JPEG XL",
}


def sniff_format(data: bytes) -> str | None:
    """The container format named by the first bytes: JPEG/PNG/WEBP, another name, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    for magic, name in _OTHER_IMAGE_MAGIC.items():
        if data.startswith(magic):
            return name
    return None


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
    fmt = sniff_format(data)
    if fmt is None:
        raise UploadError(400, "not_an_image", f"{label} is not an image (JPEG, PNG or WebP)")
    if fmt not in _SUPPORTED:
        raise UploadError(
            415, "unsupported_media_type", f"{label} is {fmt}; send JPEG, PNG or WebP"
        )
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise UploadError(413, "too_many_pixels", f"{label}: {exc}") from None
    except Exception as exc:  # PIL raises many types for garbage headers
        raise UploadError(400, "not_an_image", f"{label} has an unreadable {fmt} header: {exc}") from None
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
            f"{label} is {width}x{height} (aspect ratio {ratio:.1f}); "
            f"the limit is {limits.max_aspect_ratio:g}",
        )
    return fmt, width, height


def _label(upload: UploadedFile) -> str:
    name = f" ({upload.filename})" if upload.filename else ""
    return f"image {upload.index}{name}"
