from __future__ import annotations

from virby.mac import randomMac, stableMac


def test_random_mac_is_local_unicast() -> None:
    for _ in range(100):
        first = int(randomMac().split(":")[0], 16)
        assert first & 0x02 and not first & 0x01


def test_stable_mac_is_made_once_and_kept(tmp_path) -> None:
    path = str(tmp_path / "mac")
    mac = stableMac(path)
    assert stableMac(path) == mac
    assert (tmp_path / "mac").read_text() == mac + "\n"
    assert (tmp_path / "mac").stat().st_mode & 0o777 == 0o644


def test_stored_mac_is_normalized(tmp_path) -> None:
    (tmp_path / "mac").write_text("02:A:0:1:2:3\n")
    assert stableMac(str(tmp_path / "mac")) == "02:0a:00:01:02:03"


def test_malformed_file_is_replaced(tmp_path) -> None:
    (tmp_path / "mac").write_text("garbage")
    mac = stableMac(str(tmp_path / "mac"))
    assert (tmp_path / "mac").read_text() == mac + "\n"
