"""Model references: ``NAME@ALIAS`` and ``NAME/VERSION``."""

from __future__ import annotations

import pytest

from snap2caption.registry import RegistryError, parse_model_ref


def test_parse_model_ref() -> None:
    assert parse_model_ref("captioner@production") == ("captioner", "production")
    assert parse_model_ref("models:/detector/3") == ("detector", "3")
    with pytest.raises(RegistryError):
        parse_model_ref("captioner")
