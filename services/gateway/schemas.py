"""Wire schemas of the public gateway API: ``POST /v1/analyze`` and ``POST /v1/analyze/batch``.

The request side is declared here: :class:`AnalyzeOptions`, what to compute and how (from the query
string for uploads, from the JSON body for URLs), and the JSON bodies. The response schemas are the shared
contract in ``snap2caption.api``: the gateway declares them as ``response_model``, the client parses
answers with them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from snap2caption.api import FEATURES, Feature
from snap2caption.errors import BadRequest


def parse_features(value: object) -> frozenset[Feature]:
    """``"caption, tags"`` or ``["caption", "tags"]`` -> the feature set; ``None`` -> all.

    Raises:
        BadRequest: Not a string or a list of strings, or an unknown or empty feature list (400 with this
            message, from the query string or a JSON body alike: pydantic passes errors that are not
            ``ValueError`` through unchanged).
    """
    if value is None:
        return frozenset(FEATURES)
    if isinstance(value, str):
        names = value.split(",")
    elif isinstance(value, list | tuple | set | frozenset) and all(isinstance(n, str) for n in value):
        names = list(value)
    else:
        raise BadRequest("features must be a list of names or a comma-separated string")
    cleaned = [n.strip().lower() for n in names if n.strip()]
    unknown = sorted(set(cleaned) - set(FEATURES))
    if unknown:
        raise BadRequest(f"unknown feature(s) {', '.join(unknown)}; choose from {', '.join(FEATURES)}")
    if not cleaned:
        raise BadRequest(f"features is empty; choose from {', '.join(FEATURES)}")
    return frozenset(f for f in FEATURES if f in cleaned)


# On the wire: a list, a comma-separated string or null (all); in the model: the set.
Features = Annotated[
    frozenset[Feature],
    BeforeValidator(parse_features),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "array", "items": {"type": "string", "enum": list(FEATURES)}},
                {"type": "string"},
                {"type": "null"},
            ]
        }
    ),
]


class AnalyzeOptions(BaseModel):
    """What to compute for an image, and how.

    Uploads carry these in the query string, JSON bodies as their own fields (which win over the query's:
    ``routes.merge_options``). A field left ``None`` takes the default of whoever applies it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: Features = Field(
        default_factory=lambda: frozenset(FEATURES),  # a factory: no set (of random order) in the OpenAPI
        description="Features to compute, a list or comma-separated; default all.",
        examples=[["caption", "alt_text", "tags", "objects"], "caption,tags"],
    )
    max_tags: int | None = Field(
        default=None, ge=1, le=50, description="Most tags per image; default the gateway's."
    )
    min_confidence: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Minimum score of tags and objects; default the detector's.",
    )
    gender_neutral: bool = Field(
        default=False, description="man/woman -> person, boy/girl -> child, ... in caption and alt text."
    )

    @field_validator("gender_neutral", mode="before")
    @classmethod
    def _null_is_no(cls, value: Any) -> Any:
        return False if value is None else value


class AnalyzeUrlRequest(AnalyzeOptions):
    """``POST /v1/analyze`` with ``application/json``: analyse the image a URL points to."""

    url: str = Field(
        min_length=1,
        max_length=4096,
        description="http(s) URL of the image.",
        examples=["https://example.com/cat.jpg"],
    )


class AnalyzeBatchUrlRequest(AnalyzeOptions):
    """``POST /v1/analyze/batch`` with ``application/json``: analyse the images several URLs point to."""

    urls: list[str] = Field(min_length=1, max_length=64, description="http(s) URLs of the images.")
