"""bootpd's lease file: the formats that exist in the wild, and any text at all."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virby.leases import (
    GUEST_HOSTNAME,
    Lease,
    LeaseFile,
    LeaseFileError,
    newestIp,
    normalizeMac,
    parseLeases,
)

MAC = "52:54:00:12:03:0a"

SAMPLE = """{
\tname=virby-vm
\tip_address=192.168.64.9
\thw_address=1,52:54:0:12:3:a
\tidentifier=1,52:54:0:12:3:a
\tlease=0x6903c800
}
{
\tname=other
\tip_address=192.168.64.8
\thw_address=ff,f1:f5:dd:7f:0:2:0:0:ab:11:cb:fb:30:b0:97:b6:3a:67
\tidentifier=ff,f1:f5:dd:7f:0:2:0:0:ab:11:cb:fb:30:b0:97:b6:3a:67
\tlease=0x6903c900
}
{
\tname=virby-vm
\tip_address=192.168.64.7
\thw_address=1,52:54:0:12:3:a
\tidentifier=1,52:54:0:12:3:a
\tlease=0x6903c794
}
"""


@pytest.mark.parametrize(
    ("text", "mac"),
    [("52:54:0:12:3:a", MAC), ("52:54:00:12:03:0A", MAC), ("2:0:0:0:0:1", "02:00:00:00:00:01")],
)
def test_normalize_mac(text, mac) -> None:
    assert normalizeMac(text) == mac


@pytest.mark.parametrize("text", ["", "52:54:00:12:03", "52:54:00:12:03:0g", "123:0:0:0:0:1"])
def test_not_a_mac(text) -> None:
    assert normalizeMac(text) is None


def test_parse_sample() -> None:
    leases = parseLeases(SAMPLE)
    assert leases[0] == Lease("192.168.64.9", "1,52:54:0:12:3:a", 0x6903C800, "virby-vm")
    assert leases[0].mac == MAC
    assert leases[1].mac is None and leases[1].isDuid, "a DUID is not a MAC"
    assert newestIp(leases, MAC) == "192.168.64.9"


def test_newest_by_expiry_not_position() -> None:
    reordered = SAMPLE.replace("0x6903c800", "0x6903c700")
    assert newestIp(parseLeases(reordered), MAC) == "192.168.64.7"


def test_ties_go_to_the_first_entry() -> None:
    same = SAMPLE.replace("0x6903c794", "0x6903c800")
    assert newestIp(parseLeases(same), MAC) == "192.168.64.9"


def test_truncated_last_block_still_counts() -> None:
    text = "{\n\tip_address=192.168.64.3\n\thw_address=1,52:54:0:12:3:a\n\tlease=0x10"
    assert newestIp(parseLeases(text), MAC) == "192.168.64.3"


def test_crlf_blank_lines_unknown_keys_and_bad_addresses() -> None:
    text = (
        "{\r\n\r\n ip_address=not-an-ip\r\n hw_address=1,52:54:0:12:3:a\r\n}\r\n"
        "{\r\n colour=blue\r\n ip_address=192.168.64.4\r\n hw_address=1,52:54:0:12:3:a\r\n"
        " lease=garbage\r\n}\r\n"
    )
    leases = parseLeases(text)
    assert [lease.ip_address for lease in leases] == ["192.168.64.4"]
    assert leases[0].lease == 0


def test_a_duid_lease_never_matches() -> None:
    text = "{\n ip_address=192.168.64.5\n hw_address=ff,52:54:0:12:3:a\n lease=0x1\n}\n"
    assert newestIp(parseLeases(text), MAC) is None


@given(st.text())
def test_any_text_parses(text: str) -> None:
    for lease in parseLeases(text):
        assert isinstance(lease, Lease)


block_lines = st.lists(
    st.sampled_from(
        [
            "{",
            "}",
            "\tip_address=192.168.64.2",
            "\tip_address=300.1.1.1",
            "\thw_address=1,",
            "\thw_address=1,52:54:0:12:3:a",
            "\thw_address=ff,1:2",
            "\tlease=0x",
            "\tlease=0xzz",
            "\tlease=0x6903c794",
            "\tname=",
            "=",
            "\t",
            "ip_address",
        ]
    )
    | st.text(max_size=20),
    max_size=30,
)


@given(block_lines)
def test_near_valid_files_parse(lines: list[str]) -> None:
    leases = parseLeases("\n".join(lines))
    newestIp(leases, MAC)


def test_lease_file_missing_means_no_lease_yet(tmp_path) -> None:
    assert LeaseFile(str(tmp_path / "none")).lookup(MAC) is None


def test_lease_file_rereads_only_when_changed(tmp_path, monkeypatch) -> None:
    path = tmp_path / "dhcpd_leases"
    path.write_text(SAMPLE)
    leases = LeaseFile(str(path))
    assert leases.lookup(MAC) == "192.168.64.9"
    parsed = []
    import virby.leases

    real = virby.leases.parseLeases
    monkeypatch.setattr(virby.leases, "parseLeases", lambda t: parsed.append(t) or real(t))
    assert leases.lookup(MAC) == "192.168.64.9"
    assert parsed == [], "unchanged file is not parsed again"
    path.write_text(SAMPLE.replace("192.168.64.9", "192.168.64.10"))
    os.utime(path, ns=(1, 10**18))
    assert leases.lookup(MAC) == "192.168.64.10"
    assert len(parsed) == 1


def test_unreadable_lease_file_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(LeaseFileError) as caught:
        LeaseFile(str(tmp_path)).lookup(MAC)
    message = str(caught.value)
    assert str(tmp_path) in message and "leases-file" in message and "\n" not in message


def test_a_fifo_is_refused_at_once_without_blocking(tmp_path) -> None:
    fifo = tmp_path / "dhcpd_leases"
    os.mkfifo(fifo)
    with pytest.raises(LeaseFileError) as caught:
        LeaseFile(str(fifo)).lookup(MAC)
    message = str(caught.value)
    assert "a FIFO, not a regular file" in message and "leases-file" in message
    assert "\n" not in message


def test_a_device_is_refused(tmp_path) -> None:
    with pytest.raises(LeaseFileError, match="a character device, not a regular file"):
        LeaseFile("/dev/zero").lookup(MAC)


def test_a_huge_file_is_refused_unread(tmp_path) -> None:
    path = tmp_path / "dhcpd_leases"
    with open(path, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    with pytest.raises(LeaseFileError, match="too large"):
        LeaseFile(str(path)).lookup(MAC)


DUID_ONLY = """{
\tname=virby-vm
\tip_address=192.168.64.12
\thw_address=ff,f1:f5:dd:7f:0:2:0:0:ab:11:cb:fb:30:b0:97:b6:3a:67
\tidentifier=ff,f1:f5:dd:7f:0:2:0:0:ab:11:cb:fb:30:b0:97:b6:3a:67
\tlease=0x6903c900
}
"""


def test_a_duid_lease_for_the_vm_is_explained(tmp_path) -> None:
    path = tmp_path / "dhcpd_leases"
    path.write_text(DUID_ONLY)
    leases = LeaseFile(str(path))
    assert leases.lookup(MAC) is None
    explanation = leases.explainMissing(MAC)
    assert explanation is not None and "\n" not in explanation
    assert "DUID client id" in explanation and "192.168.64.12" in explanation
    assert 'clientid ""' in explanation and "MAC as DHCP client id" in explanation


def test_nothing_to_explain_without_a_duid_lease_for_the_vm(tmp_path) -> None:
    path = tmp_path / "dhcpd_leases"
    assert LeaseFile(str(path)).explainMissing(MAC) is None
    path.write_text(DUID_ONLY.replace("name=virby-vm", "name=other"))
    assert LeaseFile(str(path)).explainMissing(MAC) is None
    path.write_text(SAMPLE)
    assert LeaseFile(str(path)).explainMissing(MAC) is None, "the MAC has a lease"


@pytest.mark.parametrize(
    ("client_id", "mac"),
    [("1,52:54:0:12:3:a", MAC), ("ff,f1:f5:dd:7f:0:2:0:0:ab", None), ("1,zz", None),
     (None, None), ("52:54:0:12:3:a", None)],
)  # fmt: skip
def test_the_mac_is_derived_from_the_client_id(client_id, mac) -> None:
    assert Lease("192.168.64.9", client_id, 1, None).mac == mac


def test_a_symbolic_link_is_refused_not_followed(tmp_path) -> None:
    real = tmp_path / "real_leases"
    real.write_text(SAMPLE)
    link = tmp_path / "dhcpd_leases"
    link.symlink_to(real)
    with pytest.raises(LeaseFileError) as caught:
        LeaseFile(str(link)).lookup(MAC)
    message = str(caught.value)
    assert "is a symbolic link, which is not followed" in message and "\n" not in message
    assert LeaseFile(str(real)).lookup(MAC) == "192.168.64.9", "the file itself is read"


def test_a_link_above_the_file_is_followed(tmp_path) -> None:
    """macOS's /var is a link to /private/var: only the file's own name must not be one."""
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "dhcpd_leases").write_text(SAMPLE)
    (tmp_path / "var").symlink_to(tmp_path / "private")
    assert LeaseFile(str(tmp_path / "var" / "dhcpd_leases")).lookup(MAC) == "192.168.64.9"


@pytest.mark.repository
def test_the_guest_hostname_is_the_images() -> None:
    """bootpd records the name the image sends; the doctor looks leases up by it."""
    import re
    from pathlib import Path

    image = (Path(__file__).resolve().parents[2] / "nix" / "image.nix").read_text()
    names = re.findall(r'networking\.hostName\s*=\s*"([^"]*)"', image)
    assert names == [GUEST_HOSTNAME]
