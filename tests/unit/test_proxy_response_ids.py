"""Tollway-issued response ids: they carry the provider that made the response and bind it to the team, so
any replica holding the shared secret routes a follow-up, and another team's key (or a forged id) gets nothing."""

from __future__ import annotations

from services.proxy.response_ids import ResponseIds

IDS = ResponseIds(b"s" * 32)


def test_an_id_round_trips_for_its_team_only():
    public = IDS.wrap("team_a", "provider.b", "resp_abc")
    assert public.startswith("resp_") and "resp_abc" not in public
    assert IDS.unwrap("team_a", public) == ("provider.b", "resp_abc")
    assert IDS.unwrap("team_b", public) is None
    assert IDS.wrap("team_a", "provider.b", "resp_abc") == public  # deterministic: any replica wraps alike


def test_another_secret_tampering_and_raw_ids_are_refused():
    public = IDS.wrap("team_a", "p", "resp_abc")
    assert ResponseIds(b"t" * 32).unwrap("team_a", public) is None
    head, _prov, up, mac = public.split(".")
    other = IDS.wrap("team_a", "q", "resp_abc").split(".")[1]
    assert IDS.unwrap("team_a", ".".join((head, other, up, mac))) is None  # provider swapped
    for bad in ("resp_abc", "", "resp_tw1....", "resp_tw1.!!.!!.!!", "x" * 5000, public + "x", public[:-1]):
        assert IDS.unwrap("team_a", bad) is None


def test_the_secret_comes_from_the_setting_or_is_made_once_per_data_dir(tmp_path):
    import os

    import pytest
    from pydantic import ValidationError

    from services.proxy.responses import id_secret
    from services.proxy.settings import ProxySettings

    assert id_secret(ProxySettings(data_dir=tmp_path, responses_id_secret="x" * 16)) == b"x" * 16
    with pytest.raises(ValidationError):
        ProxySettings(data_dir=tmp_path, responses_id_secret="short")
    made = id_secret(ProxySettings(data_dir=tmp_path))
    assert len(made) == 64 and id_secret(ProxySettings(data_dir=tmp_path)) == made  # a restart keeps its ids valid
    key = tmp_path / "proxy" / "response_ids.key"
    assert oct(os.stat(key).st_mode & 0o777) == "0o600" and list(key.parent.iterdir()) == [key]


def test_the_mac_is_the_issued_format_so_ids_handed_out_before_stay_valid():
    import base64
    import hashlib
    import hmac

    msg = b"\x00".join((b"resp_tw1", b"team_a", b"p", b"resp_abc"))
    for secret in (b"s" * 32, b"k" * 64, b"long" * 40, b"x"):  # shorter than, one and over SHA-256's block
        mac = hmac.digest(secret, msg, hashlib.sha256)[:16]
        public = ResponseIds(secret).wrap("team_a", "p", "resp_abc")
        assert public.split(".")[3] == base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        assert ResponseIds(secret).unwrap("team_a", public) == ("p", "resp_abc")
    for team in ("team_a", "team_b", "team_a"):  # the cached HMAC state per team is never mixed up
        assert IDS.unwrap(team, IDS.wrap(team, "p", "resp_x")) == ("p", "resp_x")
    assert IDS.unwrap("team_b", IDS.wrap("team_a", "p", "resp_x")) is None
