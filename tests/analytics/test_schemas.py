"""The pandera schemas reject the errors they exist for."""

import pandas as pd
import pandera.pandas as pa
import pytest

from moe_engine.analytics import schemas


def expert_rows(**change):
    row = {"layer": 0, "expert": 1, "tokens": 4, "load_share": 0.25, "relative_load": 1.0, "mean_prob": 0.2, "dead": False}
    row.update(change)
    return pd.DataFrame([row])


def test_valid_table_passes_and_is_coerced():
    out = schemas.validate(schemas.EXPERT_LOAD, expert_rows(tokens=4.0))
    assert out["tokens"].dtype.kind == "i"


@pytest.mark.parametrize(
    "change, column",
    [({"load_share": 1.5}, "load_share"), ({"tokens": -1}, "tokens"), ({"relative_load": -0.1}, "relative_load")],
)
def test_out_of_range_values_fail(change, column):
    with pytest.raises(pa.errors.SchemaErrors) as err:
        schemas.validate(schemas.EXPERT_LOAD, expert_rows(**change))
    assert column in set(err.value.failure_cases["column"])


def test_missing_and_extra_columns_fail():
    with pytest.raises(pa.errors.SchemaErrors):
        schemas.validate(schemas.EXPERT_LOAD, expert_rows().drop(columns="dead"))
    with pytest.raises(pa.errors.SchemaErrors):
        schemas.validate(schemas.EXPERT_LOAD, expert_rows(surprise=1))


def test_pair_of_an_expert_with_itself_fails():
    frame = pd.DataFrame([{"layer": 0, "expert": 2, "other": 2, "count": 1, "coactivation": 0.5}])
    with pytest.raises(pa.errors.SchemaErrors):
        schemas.validate(schemas.COACTIVATION, frame)


def test_duplicate_layer_rows_fail():
    row = {"checkpoint": "a", "index": 0, "step": 0, "layer": 0, "saturation": 0.5, "chance": 0.25}
    with pytest.raises(pa.errors.SchemaErrors):
        schemas.validate(schemas.SATURATION, pd.DataFrame([row, row]))
