"""
The SSH keys across a change of image (L{virby.rotation}): C{virby prepare} keeps the
previous set for a VM that may still run on it, and the daemon's boot retires it.  On real
temporary directories, with the real files and modes.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from tests.unit.test_prepare import (
    DISK,
    EXPECTED,
    Crash,
    assert_consistent,
    count_renames,
    layout,
    make_image,
    snapshot,
)
from virby import keys
from virby.cli import prepare
from virby.config import Config
from virby.layout import (
    CLIENT_KEY,
    HOST_KEY,
    KNOWN_HOSTS,
    PREVIOUS_CLIENT_KEY,
    PREVIOUS_SHARED_CLIENT_KEY,
    SHARED_CLIENT_KEY,
)
from virby.locks import locked
from virby.rotation import retirePrevious


class Images:
    """Store paths of images, a new one at each call: each is a new image to prepare."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made = 0

    def __call__(self) -> str:
        self.made += 1
        path = self.root / "store" / f"{self.made}-image" / "nixos.img"
        path.parent.mkdir(parents=True)
        make_image(path, f"image {self.made}".encode())
        return str(path)


@pytest.fixture
def images(tmp_path: Path) -> Images:
    return Images(tmp_path)


@pytest.fixture
def wd(tmp_path: Path) -> Path:
    return tmp_path / "wd"


@dataclasses.dataclass(frozen=True)
class KeySet:
    """What identifies one set of keys: its client key and its host key's public half."""

    client: bytes
    host: str


def current(wd: Path) -> KeySet:
    host = keys.publicOfPrivate((wd / HOST_KEY).read_bytes())
    return KeySet((wd / CLIENT_KEY).read_bytes(), host)


def kept(wd: Path) -> KeySet | None:
    """The previous set as ssh sees it (its client key, its pin), or None when none is kept."""
    pins = keys.pinnedKeys((wd / KNOWN_HOSTS).read_text())
    assert pins is not None
    if not (wd / PREVIOUS_CLIENT_KEY).exists():
        assert len(pins) == 1, "a pin without its client key"
        return None
    assert len(pins) == 2, "a client key without its pin"
    return KeySet((wd / PREVIOUS_CLIENT_KEY).read_bytes(), pins[1])


def prepared(wd: Path, image: str, **options: object) -> Config:
    config = Config(working_directory=str(wd), image=image, disk_size=DISK, **options)  # type: ignore[arg-type]
    prepare.prepare(config)
    return config


# -- prepare keeps the previous set


def test_a_new_image_keeps_the_keys_it_replaces_as_the_previous_set(wd, images) -> None:
    prepared(wd, images())
    before = current(wd)
    informed: list[str] = []
    config = Config(working_directory=str(wd), image=images(), disk_size=DISK)
    prepare.prepare(config, inform=informed.append)
    assert current(wd) != before and current(wd).client != before.client
    assert kept(wd) == before
    assert (wd / KNOWN_HOSTS).read_text() == (
        keys.knownHostsLine(current(wd).host) + keys.knownHostsLine(before.host)
    ), "the current host key first, then the previous one"
    assert prepare.keysConsistent(config) and prepare.previousHostKey(config) == before.host
    assert layout(wd) == {**EXPECTED, PREVIOUS_CLIENT_KEY: 0o600}
    assert (
        "made new SSH keys for the VM and its client; the ones they replace stay until no VM "
        "runs on them"
    ) in informed


def test_a_second_new_image_before_a_boot_keeps_the_older_previous_set(wd, images) -> None:
    """No boot retired the first set: its VM may run still; none booted on the second."""
    prepared(wd, images())
    first = current(wd)
    prepared(wd, images())
    second = current(wd)
    prepared(wd, images())
    assert kept(wd) == first
    assert current(wd) not in (first, second)
    assert second.client not in {p.read_bytes() for p in wd.rglob("*") if p.is_file()}


def test_after_a_boot_retired_it_the_next_new_image_keeps_the_current_set(wd, images) -> None:
    prepared(wd, images())
    prepared(wd, images())
    second = current(wd)
    assert retirePrevious(str(wd))
    prepared(wd, images())
    assert kept(wd) == second


def test_keys_that_are_not_whole_are_replaced_by_a_whole_set_and_no_previous(wd, images) -> None:
    """A run killed while writing keys: neither the old VM's pin nor its key can be trusted."""
    prepared(wd, images())
    config = prepared(wd, images())
    assert kept(wd) is not None
    (wd / "vm_sshd_keys/ssh_user_ed25519_key.pub").unlink()
    prepare.prepare(config)
    assert prepare.keysConsistent(config) and kept(wd) is None
    assert layout(wd) == EXPECTED
    prepared(wd, images())
    (wd / HOST_KEY).unlink()
    prepared(wd, images())
    assert kept(wd) is None, "not even with a new image"


def test_a_run_with_nothing_to_do_keeps_the_previous_set_and_changes_nothing(wd, images) -> None:
    prepared(wd, images())
    config = prepared(wd, images(), allow_user_ssh=True)
    before = snapshot(wd)
    changes: list[str] = []
    prepare.prepare(config, warn=changes.append, inform=changes.append)
    assert changes == []
    assert snapshot(wd) == before


def test_without_an_image_the_previous_set_is_kept(wd, images, tmp_path) -> None:
    """The VM of the image before may be the builder that builds the new one."""
    prepared(wd, images())
    first = current(wd)
    prepared(wd, images())
    second = current(wd)
    missing = str(tmp_path / "store" / "missing-image" / "nixos.img")
    config = Config(working_directory=str(wd), image=missing, disk_size=DISK)
    prepare.prepare(config, derivation="/nix/store/x-image.drv", realise=False)
    assert (wd / "image-failure").exists(), "the no-image path was taken"
    assert current(wd) == second and kept(wd) == first


def test_allow_user_ssh_copies_the_previous_key_for_every_user(wd, images) -> None:
    prepared(wd, images(), allow_user_ssh=True)
    config = prepared(wd, images(), allow_user_ssh=True)
    previous = (wd / PREVIOUS_CLIENT_KEY).read_bytes()
    assert (wd / PREVIOUS_SHARED_CLIENT_KEY).read_bytes() == previous
    assert layout(wd) == {
        **EXPECTED,
        ".": 0o711,
        SHARED_CLIENT_KEY: 0o644,
        PREVIOUS_CLIENT_KEY: 0o600,
        PREVIOUS_SHARED_CLIENT_KEY: 0o644,
    }
    informed: list[str] = []
    off = dataclasses.replace(config, allow_user_ssh=False)
    prepare.prepare(off, inform=informed.append)
    assert layout(wd) == {**EXPECTED, PREVIOUS_CLIENT_KEY: 0o600}, "both copies removed"
    assert f"removed {PREVIOUS_SHARED_CLIENT_KEY} (allow-user-ssh is off)" in informed
    assert kept(wd) is not None and kept(wd).client == previous  # type: ignore[union-attr]
    prepare.prepare(config)
    assert (wd / PREVIOUS_SHARED_CLIENT_KEY).read_bytes() == previous


def test_what_is_left_of_a_previous_set_that_is_not_whole_is_dropped(wd, images) -> None:
    """A pin without its client key, or the reverse, is of no use to ssh."""
    prepared(wd, images())
    config = prepared(wd, images())
    (wd / PREVIOUS_CLIENT_KEY).unlink()
    informed: list[str] = []
    prepare.prepare(config, inform=informed.append)
    assert informed == ["removed what was left of the previous SSH keys"]
    assert layout(wd) == EXPECTED and kept(wd) is None
    (wd / PREVIOUS_CLIENT_KEY).write_bytes(keys.generate("left").private)
    informed.clear()
    prepare.prepare(config, inform=informed.append)
    assert informed == ["removed what was left of the previous SSH keys"]
    assert layout(wd) == EXPECTED


def test_a_crash_during_a_new_image_loses_the_previous_set_only_in_a_mixed_set(
    wd, images, monkeypatch
) -> None:
    """
    Wherever a run for a new image dies, the next one completes it; the previous set is
    the one before the new image, unless the run died with the current set half written.
    """
    start = images()
    prepared(wd, start)
    with monkeypatch.context() as m:
        renames = count_renames(m, None)
        prepared(wd, images())
    assert renames[2:] == [
        PREVIOUS_CLIENT_KEY,
        "ssh_host_ed25519_key",
        "ssh_user_ed25519_key.pub",
        CLIENT_KEY,
        "ssh_host_ed25519_key.pub",
        KNOWN_HOSTS,
        "image-path",
    ]
    outcomes = set()
    for crashAfter in range(1, len(renames) + 1):
        target = wd.parent / f"switch{crashAfter}"
        prepared(target, start)
        before = current(target)
        final = Config(working_directory=str(target), image=images(), disk_size=DISK)
        with monkeypatch.context() as m:
            count_renames(m, crashAfter)
            with pytest.raises(Crash):
                prepare.prepare(final)
        whole = prepare.keysConsistent(final)
        prepare.prepare(final)
        assert_consistent(final, Path(str(final.image)))
        assert kept(target) == (before if whole else None), crashAfter
        outcomes.add(whole)
    assert outcomes == {True, False}


# -- the boot retires it


def test_retiring_leaves_the_current_set_alone(wd, images) -> None:
    prepared(wd, images(), allow_user_ssh=True)
    config = prepared(wd, images(), allow_user_ssh=True)
    now = current(wd)
    assert retirePrevious(str(wd)) is True
    assert current(wd) == now and kept(wd) is None
    assert (wd / KNOWN_HOSTS).read_text() == keys.knownHostsLine(now.host)
    assert layout(wd) == {**EXPECTED, ".": 0o711, SHARED_CLIENT_KEY: 0o644}
    before = snapshot(wd)
    prepare.prepare(config)
    assert snapshot(wd) == before, "prepare has nothing to do after it"


def test_retiring_keeps_the_mode_of_known_hosts(wd, images) -> None:
    prepared(wd, images())
    prepared(wd, images())
    os.chmod(wd / KNOWN_HOSTS, 0o640)
    assert retirePrevious(str(wd))
    assert stat.S_IMODE(os.stat(wd / KNOWN_HOSTS).st_mode) == 0o640


def test_nothing_is_retired_while_prepare_holds_the_directory(wd, images) -> None:
    prepared(wd, images())
    prepared(wd, images())
    before = snapshot(wd)
    with locked(str(wd)):
        assert retirePrevious(str(wd)) is False
    assert snapshot(wd) == before
    assert retirePrevious(str(wd)) is True, "the next boot retires it"


def test_nothing_to_retire_changes_nothing(wd, images) -> None:
    prepared(wd, images())
    before = snapshot(wd)
    assert retirePrevious(str(wd)) is False
    assert snapshot(wd) == before
    prepared(wd, images())
    assert retirePrevious(str(wd)) is True
    assert retirePrevious(str(wd)) is False


def test_a_retirement_cut_short_is_finished_by_the_next(wd, images) -> None:
    """Killed after known_hosts was rewritten: the client key left is retired next time."""
    prepared(wd, images())
    prepared(wd, images())
    (wd / KNOWN_HOSTS).write_text((wd / KNOWN_HOSTS).read_text().splitlines(keepends=True)[0])
    assert retirePrevious(str(wd)) is True
    assert not (wd / PREVIOUS_CLIENT_KEY).exists()


# -- what a known_hosts may hold


def pins(*lines: str) -> str:
    return "".join(lines)


@pytest.mark.parametrize(
    ("case", "consistent"),
    [
        ("one line", True),
        ("a previous key second", True),
        ("the previous key first", False),
        ("the same key twice", False),
        ("three lines", False),
        ("a second line under another alias", False),
        ("a second line that is no key", False),
        ("no newline at the end", False),
    ],
)
def test_known_hosts_may_pin_a_previous_key_on_its_second_line(
    wd, images, case: str, consistent: bool
) -> None:
    config = prepared(wd, images())
    host = current(wd).host
    other = keys.generate("old").public
    text = {
        "one line": pins(keys.knownHostsLine(host)),
        "a previous key second": pins(keys.knownHostsLine(host), keys.knownHostsLine(other)),
        "the previous key first": pins(keys.knownHostsLine(other), keys.knownHostsLine(host)),
        "the same key twice": pins(keys.knownHostsLine(host), keys.knownHostsLine(host)),
        "three lines": pins(
            keys.knownHostsLine(host),
            keys.knownHostsLine(other),
            keys.knownHostsLine(keys.generate("older").public),
        ),
        "a second line under another alias": pins(
            keys.knownHostsLine(host), keys.knownHostsLine(other, alias="elsewhere")
        ),
        "a second line that is no key": pins(keys.knownHostsLine(host), "virby-vm-key junk\n"),
        "no newline at the end": pins(keys.knownHostsLine(host), keys.knownHostsLine(other))[:-1],
    }[case]
    (wd / KNOWN_HOSTS).write_text(text)
    assert prepare.keysConsistent(config) is consistent


def test_a_crash_right_after_keeping_the_client_key_never_pairs_it_with_a_stale_pin(
    wd, images, monkeypatch
) -> None:
    """A pin left without its client key is dropped before the current client key is kept."""
    prepared(wd, images())
    prepared(wd, images())
    (wd / PREVIOUS_CLIENT_KEY).unlink()  # a pin is left, without its client key
    before = current(wd)
    final = Config(working_directory=str(wd), image=images(), disk_size=DISK)
    with monkeypatch.context() as m:
        renames = count_renames(m, None)

        def crash(path: str, data: bytes, mode: int) -> None:
            real(path, data, mode)
            if os.path.basename(path) == PREVIOUS_CLIENT_KEY:
                raise Crash()

        real = prepare._write
        m.setattr(prepare, "_write", crash)
        with pytest.raises(Crash):
            prepare.prepare(final)
    assert PREVIOUS_CLIENT_KEY in renames
    prepare.prepare(final)
    assert kept(wd) == before
