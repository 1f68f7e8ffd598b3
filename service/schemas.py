"""Pydantic models for every request and response body of the service."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from model.orientation import RERANK_WEIGHT


class TileMatch(BaseModel):
    rank: int = Field(..., ge=1, description="1 = best match.")
    tile_id: str
    lat: float = Field(..., description="WGS84 latitude of the tile centre (camera position).")
    lon: float = Field(..., description="WGS84 longitude of the tile centre.")
    score: float = Field(..., description="Match score (-1..1): the cosine of the two descriptors, or where the model "
                         f"and index have an orientation head, {1 - RERANK_WEIGHT:g} x that cosine + "
                         f"{RERANK_WEIGHT:g} x the best column alignment (within heading_within_deg of a "
                         "given heading).")
    heading_deg: float | None = Field(
        None, description="The view's heading (its centre, degrees clockwise from north) were it taken at this "
        "tile, found by the model's orientation head; null where the model or index has none.")


class ViewInfo(BaseModel):
    """How the upload was read: its field of view and heading, and where they came from."""

    fov_deg: float = Field(..., description="Horizontal field of view, degrees.")
    projection: Literal["equirectangular", "perspective"]
    fov_source: Literal["parameter", "exif", "aspect"]
    heading_deg: float | None = Field(
        None, description="Given (parameter, XMP GPano:PoseHeadingDegrees, EXIF GPSImgDirection) or, otherwise, "
        "estimated at the best match.")
    heading_source: Literal["parameter", "xmp", "exif", "estimated"] | None = None
    heading_within_deg: float | None = Field(
        None, description="How far off a given heading was trusted to be (the heading_within_deg parameter): the "
        "matches were aligned with the view only within this much of it; null where the heading was not given.")
    pitch_deg: float = Field(0.0, description="The photo's camera pitch it was placed with (0: level).")
    roll_deg: float = Field(0.0, description="The photo's camera roll it was placed with (0: level).")
    tilt_source: Literal["parameter", "estimated"] | None = Field(
        None, description="Where a photo's pitch and roll came from: the parameters, or estimated from its "
        "vertical edges; null for a panorama or a crop of one (level).")


class Confidence(BaseModel):
    """How clearly the best match beats the best one elsewhere (at least `distinct_m` away)."""

    margin: float | None = Field(..., description="Score of the best match minus that of the best match at least "
                                 "distinct_m from it; null when none of the candidates is that far.")
    ambiguous: bool = Field(..., description="True when the margin is below GEOLOC_AMBIGUITY_MARGIN: two "
                            "different places look alike, do not trust the best match alone.")
    competitor_tile_id: str | None = None
    distinct_m: float


class Position(BaseModel):
    """Where the view was taken: the score-weighted centre of the best match and the matches
    consistent with it (model.metrics.refine_position)."""

    lat: float
    lon: float
    uncertainty_m: float = Field(..., description="Radius in metres: the weighted spread of those tiles, at least a "
                                 "quarter tile.")


class NearInfo(BaseModel):
    """The geographic prior the search was restricted to."""

    lat: float
    lon: float
    radius_m: float
    source: Literal["parameter", "exif"]
    tiles: int = Field(..., description="Tiles within the radius: the only ones searched (0: no results).")


class ModelInfo(BaseModel):
    fingerprint: str
    checkpoint: str = Field(..., description="File name of the loaded checkpoint.")
    embedding_dim: int
    device: str
    ground_size: tuple[int, int]


class IndexInfo(BaseModel):
    model_fingerprint: str
    count: int
    embedding_dim: int
    metric: str
    index_type: str
    built_at: str
    catalog_sha256: str | None = None
    generation: int = Field(..., description="Increases by one with every index swap.")


class Timing(BaseModel):
    decode: float = Field(..., description="Upload decoding + preprocessing, ms.")
    queue: float = Field(..., description="Wait for the inference worker, ms.")
    encode: float = Field(..., description="Ground-branch forward of the micro-batch, ms.")
    search: float = Field(..., description="FAISS search of the micro-batch, ms.")
    total: float = Field(..., description="Server-side time from request start to answer, ms.")


class ImageAnswer(BaseModel):
    """One image's answer."""

    results: list[TileMatch]
    position: Position | None = Field(None, description="Null when there are no results.")
    near: NearInfo | None = Field(None, description="The geographic prior, when one restricted the search.")
    view: ViewInfo
    confidence: Confidence
    batch_size: int = Field(..., description="Images in the micro-batch this one was computed in.")


class LocalizeResponse(ImageAnswer):
    model: ModelInfo
    index: IndexInfo
    timing_ms: Timing


class BatchItem(ImageAnswer):
    image: int = Field(..., description="Position of the image in the request (0-based).")
    filename: str | None = None


class LocalizeBatchResponse(BaseModel):
    items: list[BatchItem]
    model: ModelInfo
    index: IndexInfo
    timing_ms: Timing


class PointGeometry(BaseModel):
    type: Literal["Point"] = "Point"
    coordinates: tuple[float, float] = Field(..., description="[longitude, latitude] (RFC 7946).")


class Feature(BaseModel):
    type: Literal["Feature"] = "Feature"
    geometry: PointGeometry
    properties: dict[str, Any]


class FeatureCollection(BaseModel):
    """RFC 7946 FeatureCollection; model/index/timing_ms are foreign members."""

    type: Literal["FeatureCollection"] = "FeatureCollection"
    features: list[Feature]
    model: ModelInfo
    index: IndexInfo
    timing_ms: dict[str, float]


class ErrorResponse(BaseModel):
    detail: Any = Field(..., description="Human-readable message (a list for validation errors).")
    code: str = Field(..., description="Stable machine-readable error code.")
    request_id: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed", "stopping"]
    detail: str | None = None
    model: ModelInfo | None = None
    index: IndexInfo | None = None
    queue_depth: int = 0


class ReloadResult(BaseModel):
    status: Literal["reloaded", "unchanged"]
    index: IndexInfo
    previous: IndexInfo | None = None
