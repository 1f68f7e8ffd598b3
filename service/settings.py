"""Service configuration, read from ``GEOLOC_*`` environment variables (pydantic-settings).

Every knob of the service lives here so that ``create_app(Settings(...))`` in tests and
``uvicorn service.app:app`` in production see exactly the same set of options.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_CHECKPOINT = Path("weights/l2ltr_tiny_demo.safetensors")


# the status of a service that refuses to start (model or index would not load); uvicorn's STARTUP_FAILURE
# too, the status on which its supervisor of several workers stops instead of starting another
EXIT_LOAD_FAILURE = 3


class Settings(BaseSettings):
    """All service settings. Environment variable = ``GEOLOC_`` + upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix="GEOLOC_", extra="ignore", frozen=True)

    # --- what to serve --------------------------------------------------------------------
    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="L2LTR checkpoint (.safetensors).")
    index: Path | None = Field(
        None, description="Index artifact directory written by index_build (a symlink is fine)."
    )
    device: str = Field("cpu", description='Torch device: "cpu", "cuda", "cuda:1" or "auto".')
    encoder_workers: int | None = Field(
        None, ge=1, le=64,
        description="Encoder threads, each running one micro-batch at a time; unset = 2 on a CPU (1 on "
        "a single core), 1 on a GPU. With several server processes, give each its share of the cores.",
    )
    torch_threads: int | None = Field(
        None, ge=1,
        description="torch threads per encoder thread; unset = the CPUs divided among them, and a lone image on all.",
    )

    view_phases: int | None = Field(
        None, ge=1, le=16,
        description="Sub-column phases each view is encoded at against an index with column features, one "
        "forward each; unset = the index's tile phases (most accurate); 1 = one forward (fastest). The "
        "model's token columns must split into them (1, 2, 4, 8 or 16 for the shipped checkpoints).",
    )

    # --- micro-batching and backpressure --------------------------------------------------
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most images per forward pass.")
    max_batch_wait_ms: float = Field(
        0.0, ge=0, le=1000,
        description="Longest the oldest queued image waits for companions; 0 = a free encoder "
        "thread takes what is queued at once.",
    )
    queue_size: int = Field(64, ge=1, description="Images that may wait; beyond that: 503.")
    request_timeout_s: float = Field(30.0, gt=0, description="Longest wait for a result (504).")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 answers.")

    # --- upload limits --------------------------------------------------------------------
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Per image, in bytes.")
    max_inflight_upload_bytes: int = Field(
        256 * 1024 * 1024, ge=1024,
        description="Upload bytes all requests in progress may hold in memory together; a request "
        "that would exceed it gets 503 (retry).",
    )
    read_timeout_s: float = Field(
        30.0, gt=0, description="Longest pause while a client sends its request (headers, "
        "with `python -m service`, and body): 408 after it.",
    )
    max_batch_images: int = Field(8, ge=1, description="Most images in one /localize/batch.")
    max_pixels: int = Field(40_000_000, ge=1, description="Width x height limit (bombs).")
    min_image_side: int = Field(16, ge=1, description="Smallest accepted width or height.")
    max_aspect_ratio: float = Field(
        6.0, ge=1.0, description="Largest accepted max(w/h, h/w): street-level views are at most a "
        "panorama's ~2:1 to 5.5:1 (CVUSA); a thinner strip is refused (400)."
    )
    ambiguity_margin: float = Field(
        0.02, ge=0, description="An answer whose best match beats the best one elsewhere (150 m or more "
        "away) by less than this score is flagged ambiguous.",
    )

    # --- security -------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted X-API-Key values (comma-separated or JSON list); empty = no auth.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin/*; unset = admin endpoints disabled."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Allowed CORS origins (comma-separated or JSON list)."
    )

    # --- index hot reload -----------------------------------------------------------------
    reload_poll_s: float = Field(
        2.0, ge=0, description="How often to check GEOLOC_INDEX for a new artifact; 0 = never."
    )

    # --- operations -----------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_logs: bool = Field(True, description="One JSON object per log line (with request_id).")
    thumbnail_px: int = Field(256, ge=16, le=2048, description="Longest side of tile thumbnails.")
    thumbnail_cache: int = Field(512, ge=0, description="Thumbnails kept in memory (LRU).")
    exit_on_load_failure: bool = Field(
        True,
        description="Exit the process (status 3) when the initial model/index load fails, "
        "e.g. on a fingerprint mismatch. Tests turn it off to inspect /readyz.",
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _lists_from_env(cls, value: object) -> object:
        """A JSON list (``["a","b"]``) or a comma-separated string (``a,b``); blank: none. A blank
        item (``a,`` or ``${K1},${K2}`` with both unset) is kept, for ``_check_lists`` to refuse: it
        must not turn API keys off unnoticed."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",")] if text else []

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_lists(self) -> "Settings":
        if any(not key.get_secret_value().strip() for key in self.api_keys):
            raise ValueError("GEOLOC_API_KEYS must not contain empty keys (a stray comma, or an unset variable in it)")
        if any(not origin for origin in self.cors_origins):
            raise ValueError("GEOLOC_CORS_ORIGINS must not contain empty origins")
        if self.queue_size < self.max_batch_images:
            raise ValueError(
                f"GEOLOC_QUEUE_SIZE ({self.queue_size}) must be at least GEOLOC_MAX_BATCH_IMAGES "
                f"({self.max_batch_images}), or a full /localize/batch request could never queue"
            )
        if self.max_inflight_upload_bytes < self.max_batch_body_bytes:
            raise ValueError(
                f"GEOLOC_MAX_INFLIGHT_UPLOAD_BYTES ({self.max_inflight_upload_bytes}) must be at least "
                f"one full /localize/batch body ({self.max_batch_body_bytes} bytes: "
                "GEOLOC_MAX_BATCH_IMAGES x (GEOLOC_MAX_UPLOAD_BYTES + 64 KiB))"
            )
        return self

    @property
    def max_body_bytes(self) -> int:
        """Byte limit of one /localize request body: the image plus multipart framing."""
        return self.max_upload_bytes + 64 * 1024

    @property
    def max_batch_body_bytes(self) -> int:
        return self.max_batch_images * self.max_body_bytes


def settings_or_exit(prog: str) -> Settings:
    """Settings from the environment; a wrong GEOLOC_* variable ends the process (status 2) with one
    line naming each wrong variable and why, not a traceback (also under a bare uvicorn)."""
    try:
        return Settings()
    except ValidationError as exc:
        parts = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else None  # none: a check across several variables
            shown = field not in (None, "api_keys", "admin_token") and isinstance(error["input"], str)  # no secrets
            parts.append((f"GEOLOC_{field.upper()}: " if field else "") + error["msg"].removeprefix("Value error, ")
                         + (f" (got {error['input']!r})" if shown else ""))
        print(f"{prog}: invalid settings: {'; '.join(parts)}", file=sys.stderr)
        raise SystemExit(2) from None
