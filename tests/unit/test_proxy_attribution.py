"""Attribution on the request path: end user and tags from the request, bounded, merged under the key's tags."""

from __future__ import annotations

import pytest

from schemas.tags import MAX_TAGS, MAX_VALUE_CHARS
from services.proxy.attribution import InvalidTag
from services.proxy.attribution import attribute as attribute_raw

KEY = {"cost_centre": "cc-42"}


def attribute(body: dict, headers: dict[str, str], key: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """The headers as an ASGI server hands them over: lower-cased names, latin-1 bytes."""
    raw = [(b"host", b"proxy"), *((k.lower().encode(), v.encode("latin-1")) for k, v in headers.items())]
    return attribute_raw(body, raw, key)


def test_plain_call_gets_the_key_tags_and_no_end_user() -> None:
    assert attribute({"model": "m"}, {}, KEY) == (None, KEY)


def test_header_tags_are_parsed_and_trimmed() -> None:
    _, tags = attribute({}, {"x-tollway-tags": " project=apollo , env=prod,"}, {})
    assert tags == {"project": "apollo", "env": "prod"}


def test_body_metadata_is_tags_and_header_wins_over_body() -> None:
    body = {"metadata": {"project": "from-body", "feature": "search"}}
    _, tags = attribute(body, {"x-tollway-tags": "project=from-header"}, {})
    assert tags == {"project": "from-header", "feature": "search"}


def test_key_admin_tags_win_over_caller_tags() -> None:
    body = {"metadata": {"cost_centre": "someone-elses", "project": "apollo"}}
    _, tags = attribute(body, {"x-tollway-tags": "cost_centre=mine"}, KEY)
    assert tags == {"cost_centre": "cc-42", "project": "apollo"}
    assert KEY == {"cost_centre": "cc-42"}  # the key's own map is never written


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"user": "u1", "safety_identifier": "s1", "metadata": {"user_id": "m1"}}, "u1"),
        ({"safety_identifier": "s1", "metadata": {"user_id": "m1"}}, "s1"),
        ({"metadata": {"user_id": "m1"}}, "m1"),
        ({"user": 7, "safety_identifier": "s1"}, "s1"),  # not a string: not an end user
        ({"user": "x" * 300}, "x" * 256),
    ],
)
def test_end_user_first_present_wins(body: dict, expected: str) -> None:
    assert attribute(body, {}, {})[0] == expected


def test_anthropic_metadata_user_id_is_the_end_user_and_never_a_tag() -> None:
    # Claude Code sends a session id there: as a tag it would be one tag value per session
    end_user, tags = attribute({"metadata": {"user_id": "session-1", "project": "apollo"}}, {}, {})
    assert end_user == "session-1" and tags == {"project": "apollo"}


@pytest.mark.parametrize(
    ("body", "header", "named"),
    [
        ({"metadata": {"bad key": "v"}}, None, "bad key"),
        ({"metadata": {"k" * 65: "v"}}, None, "k" * 65),
        ({"metadata": {"": "v"}}, None, "''"),
        ({"metadata": {"project": 5}}, None, "project"),
        ({"metadata": {"project": "x" * (MAX_VALUE_CHARS + 1)}}, None, "project"),
        ({"metadata": {"project": "a\nb"}}, None, "project"),
        ({}, "project=apollo,project=zeus", "project"),
        ({}, "project", "project"),
        ({}, "pro ject=a", "pro ject"),
        ({"metadata": ["project"]}, None, "metadata"),
        ({"metadata": "project=apollo"}, None, "metadata"),
    ],
)
def test_bad_tags_are_refused_naming_the_tag(body: dict, header: str | None, named: str) -> None:
    headers = {} if header is None else {"x-tollway-tags": header}
    with pytest.raises(InvalidTag) as err:
        attribute(body, headers, {})
    assert err.value.status == 400 and err.value.type == "invalid_request_error"
    assert named in err.value.message


def test_more_than_sixteen_tags_are_refused_across_header_and_body() -> None:
    body = {"metadata": {f"b{i}": "v" for i in range(10)}}
    header = ",".join(f"h{i}=v" for i in range(MAX_TAGS - 10 + 1))
    with pytest.raises(InvalidTag, match="At most 16"):
        attribute(body, {"x-tollway-tags": header}, {})
    # exactly 16 is fine, and the key's own tags do not count against the caller's 16
    ok = ",".join(f"h{i}=v" for i in range(MAX_TAGS - 10))
    _, tags = attribute(body, {"x-tollway-tags": ok}, KEY)
    assert len(tags) == MAX_TAGS + 1


def test_a_long_header_stops_parsing_past_the_bound() -> None:
    header = ",".join(f"t{i}=v" for i in range(10_000))
    with pytest.raises(InvalidTag, match="At most 16"):
        attribute({}, {"x-tollway-tags": header}, {})


def test_header_name_is_matched_case_insensitively_as_asgi_lowercases_it() -> None:
    assert attribute({}, {"X-Tollway-Tags": "a=b"}, {})[1] == {"a": "b"}


def test_empty_values_are_tags() -> None:
    assert attribute({"metadata": {"ticket": ""}}, {}, {})[1] == {"ticket": ""}
