"""check_schema: the task's one JSON-schema rule, with one checked validator per schema."""

import pytest

from edgedistill.task import _validator, check_schema

SCHEMA = {"type": "object", "properties": {"people": {"type": "string", "maxLength": 4}}, "additionalProperties": False}


def test_check_schema_accepts_valid_and_rejects_invalid_answers():
    assert check_schema({}, SCHEMA) is None  # an empty extraction is a right answer
    assert check_schema({"people": "4"}, SCHEMA) is None
    assert check_schema({"people": "four people"}, SCHEMA) == "schema"  # too long
    assert check_schema({"guests": "4"}, SCHEMA) == "schema"  # an invented field
    assert check_schema(["4"], SCHEMA) == "schema"


def test_one_validator_per_schema_is_reused():
    schema = {**SCHEMA, "title": "reuse"}
    before = _validator.cache_info()
    for _ in range(5):
        check_schema({"people": "2"}, schema)
    after = _validator.cache_info()
    assert after.misses - before.misses == 1 and after.hits - before.hits == 4
    # the same schema with its keys in another order is the same validator
    check_schema({}, dict(reversed(list(schema.items()))))
    assert _validator.cache_info().misses == after.misses


def test_an_invalid_schema_is_an_error_not_a_pass():
    import jsonschema

    with pytest.raises(jsonschema.SchemaError):
        check_schema({}, {"type": "no-such-type"})
