"""The one multipart reader (gateway and model services), through a tiny app built with the factory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient

from snap2caption.http import create_app
from snap2caption.http.uploads import is_multipart, read_form_files

MAX_BYTES = 10  # the per-image cap of the route below

router = APIRouter()


@router.post("/v1/one")
async def one(request: Request) -> dict[str, Any]:
    return await _read(request, ("file",), max_files=1)


@router.post("/v1/many")
async def many(request: Request) -> dict[str, Any]:
    return await _read(request, ("file", "files"), max_files=4)


async def _read(request: Request, fields: tuple[str, ...], max_files: int) -> dict[str, Any]:
    if not is_multipart(request):
        return {"multipart": False}
    uploads = await read_form_files(request, fields, max_files, MAX_BYTES)
    return {"multipart": True, "uploads": [[name, data.decode()] for name, data in uploads]}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app("uploads-test", "0", routers=[router])) as test_client:
        yield test_client


def _error(response: Any) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    message: str = error["message"]
    return message


def test_files_come_back_in_body_order_and_other_fields_are_ignored(client: TestClient) -> None:
    files = [("files", ("b.png", b"bbb")), ("note", (None, b"hello")), ("file", ("a.png", b"a"))]
    answer = client.post("/v1/many", files=files).json()
    assert answer == {"multipart": True, "uploads": [["b.png", "bbb"], ["a.png", "a"]]}


def test_each_file_is_read_to_one_byte_past_the_cap_and_an_empty_one_is_returned(client: TestClient) -> None:
    files = [("files", ("big.png", b"x" * 1000)), ("files", ("empty.png", b""))]
    uploads = client.post("/v1/many", files=files).json()["uploads"]
    # The decoder refuses the first (over the cap) without the upload being held whole; the caller
    # decides about the empty one (one image of a batch, or the whole request).
    assert uploads == [["big.png", "x" * (MAX_BYTES + 1)], ["empty.png", ""]]


def test_a_raw_body_is_not_multipart(client: TestClient) -> None:
    answer = client.post("/v1/one", content=b"\x89PNG", headers={"content-type": "image/png"}).json()
    assert answer == {"multipart": False}


def test_refusals_say_what_to_send(client: TestClient) -> None:
    text = client.post("/v1/one", files={"file": (None, b"not a file")})
    assert _error(text) == "form field 'file' must be a file upload, not text"
    wrong = client.post("/v1/one", files={"image": ("a.png", b"a"), "caption": (None, b"x")})
    assert _error(wrong) == (
        "no image: send a multipart file field named 'file'; found fields ['caption', 'image']"
    )
    none = client.post("/v1/many", files={"caption": (None, b"x")})
    assert _error(none) == (
        "no image: send multipart file fields named 'file' or 'files'; found fields ['caption']"
    )
    too_many = [("files", (f"{i}.png", b"a")) for i in range(5)]
    _error(client.post("/v1/many", files=too_many))  # the parser's own cap
