"""docs/output-schema.md describes exactly the columns skinray/score/schema.py writes."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

from skinray.score.schema import error_schema, probability_column, result_schema

DOC = (Path(__file__).resolve().parents[1] / "docs" / "output-schema.md").read_text()


def _documented(section: str) -> dict[str, str]:
    body = DOC.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", body, flags=re.M))


def _arrow_name(type_: pa.DataType) -> str:
    if pa.types.is_timestamp(type_):
        return f"timestamp[{type_.unit}, {type_.tz}]"
    return {"float": "float32", "large_string": "string"}.get(str(type_), str(type_))


def test_result_columns_match_the_documentation():
    documented = _documented("results")
    schema = result_schema(["melanoma"])
    actual = {
        ("prob_<class>" if f.name == probability_column("melanoma") else f.name): _arrow_name(
            f.type
        )
        for f in schema
    }
    documented.pop("run_date")  # the partition column, added by the directory layout
    assert actual == documented


def test_error_columns_match_the_documentation():
    documented = _documented("errors")
    documented.pop("run_date")
    assert {f.name: _arrow_name(f.type) for f in error_schema()} == documented


def test_probability_columns_are_safe_identifiers():
    assert probability_column("Seborrheic keratosis") == "prob_seborrheic_keratosis"
    assert [f.name for f in result_schema(["mel", "nv"]) if f.name.startswith("prob_")] == [
        "prob_mel",
        "prob_nv",
    ]
