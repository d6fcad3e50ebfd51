"""Attribution reports, pure: which dimension a report names, the dashboard filter, and how a rounded amount
is shared out so a breakdown foots to the cent."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.billing.attribution import dimension, filter_of, share
from services.billing.errors import InvalidRequest
from services.billing.usage import build_query, parse_group_by

D = Decimal


def test_share_foots_to_the_rounded_amount_by_largest_remainder() -> None:
    exact = {"a": D("0.004"), "b": D("0.004"), "c": D("0.004")}  # 0.012 -> a line of 0.01
    assert share(D("0.01"), exact) == {"a": D("0.01"), "b": D("0"), "c": D("0")}  # ties go in label order
    exact = {"apollo": D("1.23456"), "zeus": D("2.00999"), "(none)": D("0.00545")}
    amount = D("3.25")  # round(3.25000) to the cent
    got = share(amount, exact)
    assert sum(got.values()) == amount
    assert got == {"apollo": D("1.23"), "zeus": D("2.01"), "(none)": D("0.01")}
    for label, v in got.items():
        assert abs(v - exact[label]) < D("0.01")


def test_share_of_a_line_rounded_up_and_down() -> None:
    exact = {"x": D("0.333333"), "y": D("0.333333"), "z": D("0.333334")}
    assert sum(share(D("1.00"), exact).values()) == D("1.00")
    exact = {"x": D("0.0049"), "y": D("0.0049")}  # 0.0098 -> 0.01
    assert share(D("0.01"), exact) == {"x": D("0.01"), "y": D("0")}


def test_dimensions_bind_the_tag_name_and_refuse_bad_ones() -> None:
    d = dimension("tag:project")
    assert d.field == "tag_value" and d.params["tag"] == "project" and "project" not in d.sql
    assert dimension("end_user").field == "end_user"
    for bad in ("tag:", "tag:pro ject", "tag:" + "k" * 65, "project", "tag:a'b"):
        with pytest.raises(InvalidRequest):
            dimension(bad)


def test_usage_group_by_accepts_end_user_and_tags() -> None:
    assert parse_group_by("end_user") == "end_user" and parse_group_by("tag:env") == "tag:env"
    with pytest.raises(InvalidRequest):
        parse_group_by("tag:bad name")
    with pytest.raises(InvalidRequest):
        parse_group_by("user")
    now = datetime(2026, 12, 1, tzinfo=UTC)
    sql, params = build_query("t1", now, now, "tag:env")
    assert params["tag"] == "env" and "mapContains(x.metadata, {tag:String})" in sql


def test_dashboard_filter() -> None:
    assert filter_of(None, None) is None and filter_of("", "") is None
    f = filter_of("alice", "project=apollo")
    assert f is not None and f.params == {"f_end_user": "alice", "f_tag": "project", "f_value": "apollo"}
    none = filter_of("(none)", "project=(none)")
    assert none is not None and none.params["f_end_user"] == "" and "NOT mapContains" in none.sql
    for bad in ("project", "=apollo", "pro ject=a"):
        with pytest.raises(InvalidRequest):
            filter_of(None, bad)
