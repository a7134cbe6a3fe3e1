"""
C{virby prepare} on a real temporary directory: the exact layout and modes, idempotence,
a new image, disk growth, allow-user-ssh, --owner, and refusals that touch nothing.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from tests.played_user import PlayedUser
from virby import cli, disk, keys, shares
from virby.cli import prepare
from virby.config import MIB, Config
from virby.errors import VirbyError
from virby.layout import PREVIOUS_CLIENT_KEY

DISK = 8 * MIB


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing may catch it on the way."""


def make_image(path: Path, marker: bytes) -> bytes:
    """A small sparse raw image with data at its start and in its middle."""
    with open(path, "wb") as f:
        f.truncate(2 * MIB)
        f.write(marker)
        f.seek(MIB)
        f.write(os.urandom(4096))
    return path.read_bytes()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "abc-image" / "nixos.img"
    path.parent.mkdir(parents=True)
    make_image(path, b"first image")
    return path


@pytest.fixture
def config(tmp_path: Path, image: Path) -> Config:
    return Config(working_directory=str(tmp_path / "wd"), image=str(image), disk_size=DISK)


def layout(wd: Path) -> dict[str, int]:
    """Every path under C{wd} (and C{wd} itself as "."), with its permission bits."""
    found = {".": stat.S_IMODE(os.lstat(wd).st_mode)}
    for path in wd.rglob("*"):
        found[str(path.relative_to(wd))] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def snapshot(wd: Path) -> dict[str, tuple[int, int, int]]:
    """Inode, mtime and mode of everything: what a run with nothing to do must not change."""
    return {
        str(p.relative_to(wd)): (p.lstat().st_ino, p.lstat().st_mtime_ns, p.lstat().st_mode)
        for p in [wd, *wd.rglob("*")]
    }


def assert_consistent(config: Config, image: Path) -> None:
    """The state every run must end in, whatever happened before it."""
    wd = Path(config.working_directory)
    content = image.read_bytes()
    assert (wd / "base.img").read_bytes() == content
    diff = (wd / "diff.img").read_bytes()
    assert diff[: len(content)] == content and len(diff) == max(len(content), config.disk_size)
    assert prepare.keysConsistent(config)
    assert prepare.recordedImage(config) == str(image)
    leftovers = [p.name for p in wd.rglob("*") if p.name.endswith(disk.TEMP_SUFFIX)]
    assert leftovers == []


EXPECTED = {
    ".": 0o700,
    "base.img": 0o600,
    "diff.img": 0o600,
    "vm_sshd_keys": 0o700,
    "vm_sshd_keys/ssh_host_ed25519_key": 0o600,
    "vm_sshd_keys/ssh_user_ed25519_key.pub": 0o644,
    "ssh_user_ed25519_key": 0o600,
    "ssh_host_ed25519_key.pub": 0o644,
    "ssh_known_hosts": 0o644,
    "image-path": 0o644,
}


def test_first_run_makes_the_exact_layout_with_the_exact_modes(config: Config, image) -> None:
    prepare.prepare(config)
    wd = Path(config.working_directory)
    assert layout(wd) == EXPECTED
    assert_consistent(config, image)
    assert os.stat(wd / "diff.img").st_size == DISK
    assert (wd / "image-path").read_text() == f"{image}\n"


def test_first_run_ignores_the_umask(config: Config) -> None:
    old = os.umask(0)
    try:
        prepare.prepare(config)
    finally:
        os.umask(old)
    assert layout(Path(config.working_directory)) == EXPECTED


def test_the_keys_belong_together(config: Config) -> None:
    prepare.prepare(config)
    wd = Path(config.working_directory)
    host = keys.publicOfPrivate((wd / "vm_sshd_keys/ssh_host_ed25519_key").read_bytes())
    client = keys.publicOfPrivate((wd / "ssh_user_ed25519_key").read_bytes())
    assert host != client
    assert (wd / "ssh_known_hosts").read_text() == f"virby-vm-key {host}\n"
    assert keys.barePublic((wd / "ssh_host_ed25519_key.pub").read_text()) == host
    assert keys.barePublic((wd / "vm_sshd_keys/ssh_user_ed25519_key.pub").read_text()) == client


def test_a_second_run_changes_nothing(config: Config) -> None:
    prepare.prepare(config)
    before = snapshot(Path(config.working_directory))
    changes: list[str] = []
    prepare.prepare(config, warn=changes.append, inform=changes.append)
    assert changes == []
    assert snapshot(Path(config.working_directory)) == before


def test_a_new_image_path_replaces_the_disks_and_the_keys(config: Config, tmp_path: Path) -> None:
    prepare.prepare(config)
    wd = Path(config.working_directory)
    old_keys = (wd / "ssh_user_ed25519_key").read_bytes(), (wd / "ssh_known_hosts").read_bytes()
    new_image = tmp_path / "store" / "def-image.img"
    make_image(new_image, b"second image")
    changed = Config(working_directory=str(wd), image=str(new_image), disk_size=DISK)
    prepare.prepare(changed)
    assert_consistent(changed, new_image)
    assert (wd / "diff.img").read_bytes().startswith(b"second image")
    new_keys = (wd / "ssh_user_ed25519_key").read_bytes(), (wd / "ssh_known_hosts").read_bytes()
    assert new_keys[0] != old_keys[0] and new_keys[1] != old_keys[1]


def test_the_same_path_with_other_content_is_the_same_image(config: Config, image) -> None:
    """A store path never changes content; the VM's disk must not be thrown away on a whim."""
    prepare.prepare(config)
    diff = Path(config.working_directory) / "diff.img"
    with open(diff, "r+b") as f:
        f.write(b"guest data")
    make_image(image, b"rewritten")
    prepare.prepare(config)
    assert diff.read_bytes().startswith(b"guest data")


def test_a_bigger_disk_size_grows_diff_img_and_keeps_its_content(config: Config) -> None:
    prepare.prepare(config)
    diff = Path(config.working_directory) / "diff.img"
    with open(diff, "r+b") as f:
        f.write(b"guest data")
    inode = diff.stat().st_ino
    informed: list[str] = []
    bigger = Config(
        working_directory=config.working_directory, image=config.image, disk_size=3 * DISK
    )
    prepare.prepare(bigger, inform=informed.append)
    assert diff.stat().st_size == 3 * DISK
    assert diff.stat().st_ino == inode
    assert diff.read_bytes().startswith(b"guest data")
    assert informed == ["grew diff.img from 8MiB to 24MiB"]


def test_a_smaller_disk_size_warns_and_keeps_diff_img(config: Config) -> None:
    prepare.prepare(config)
    diff = Path(config.working_directory) / "diff.img"
    before = snapshot(Path(config.working_directory))
    warnings: list[str] = []
    smaller = Config(
        working_directory=config.working_directory, image=config.image, disk_size=4 * MIB
    )
    prepare.prepare(smaller, warn=warnings.append)
    assert diff.stat().st_size == DISK
    assert snapshot(Path(config.working_directory)) == before
    assert len(warnings) == 1 and "smaller" in warnings[0] and "4MiB" in warnings[0]


def test_the_default_warning_is_a_line_on_stderr(config: Config, capsys) -> None:
    prepare.prepare(config)
    smaller = Config(working_directory=config.working_directory, image=config.image, disk_size=MIB)
    prepare.prepare(smaller)
    err = capsys.readouterr().err
    assert err.startswith("virby prepare: warning: ") and err.count("\n") == 1


def test_ephemeral_makes_base_img_and_the_keys_but_no_diff_img(config: Config, image) -> None:
    ephemeral = dataclasses.replace(config, ephemeral=True)
    prepare.prepare(ephemeral)
    wd = Path(config.working_directory)
    assert layout(wd) == {name: mode for name, mode in EXPECTED.items() if name != "diff.img"}
    assert (wd / "base.img").read_bytes() == image.read_bytes()
    assert prepare.keysConsistent(ephemeral)
    before = snapshot(wd)
    prepare.prepare(ephemeral)
    assert snapshot(wd) == before, "a second run changes nothing"


def test_ephemeral_leaves_the_disk_the_vm_may_be_running_on(config: Config, tmp_path) -> None:
    """The daemon replaces diff.img at the next boot; the VM may be using it right now."""
    prepare.prepare(config)
    wd = Path(config.working_directory)
    with open(wd / "diff.img", "r+b") as f:
        f.write(b"guest data")
    new_image = tmp_path / "store" / "def-image.img"
    make_image(new_image, b"second image")
    informed: list[str] = []
    changed = Config(
        working_directory=str(wd), image=str(new_image), disk_size=3 * DISK, ephemeral=True
    )
    prepare.prepare(changed, inform=informed.append)
    assert (wd / "base.img").read_bytes().startswith(b"second image")
    assert (wd / "diff.img").read_bytes().startswith(b"guest data")
    assert (wd / "diff.img").stat().st_size == DISK, "not grown: the next boot's copy is"
    assert not any("diff.img" in line for line in informed)


def test_a_missing_diff_img_is_made_again_without_new_keys(config: Config, image) -> None:
    prepare.prepare(config)
    wd = Path(config.working_directory)
    client = (wd / "ssh_user_ed25519_key").read_bytes()
    (wd / "diff.img").unlink()
    (wd / "base.img").unlink()
    prepare.prepare(config)
    assert_consistent(config, image)
    assert (wd / "ssh_user_ed25519_key").read_bytes() == client


@pytest.mark.parametrize(
    "name", sorted(set(EXPECTED) - {".", "vm_sshd_keys", "image-path", "base.img", "diff.img"})
)
def test_a_missing_key_file_makes_a_whole_new_set_and_keeps_the_disk(config, image, name) -> None:
    prepare.prepare(config)
    wd = Path(config.working_directory)
    disk_before = snapshot(wd)["diff.img"]
    client = (wd / "ssh_user_ed25519_key").read_bytes()
    (wd / name).unlink()
    prepare.prepare(config)
    assert_consistent(config, image)
    assert (wd / "ssh_user_ed25519_key").read_bytes() != client
    assert snapshot(wd)["diff.img"] == disk_before


def test_a_mixed_set_of_keys_is_replaced(config: Config) -> None:
    prepare.prepare(config)
    wd = Path(config.working_directory)
    (wd / "ssh_known_hosts").write_text(keys.knownHostsLine(keys.generate("x").public))
    assert not prepare.keysConsistent(config)
    prepare.prepare(config)
    assert prepare.keysConsistent(config)


def test_allow_user_ssh_keeps_a_readable_copy_and_removes_it_when_off(config: Config) -> None:
    wd = Path(config.working_directory)
    allowed = Config(
        working_directory=str(wd), image=config.image, disk_size=DISK, allow_user_ssh=True
    )
    prepare.prepare(allowed)
    assert layout(wd) == {**EXPECTED, ".": 0o711, "ssh_user_ed25519_key.shared": 0o644}
    shared = wd / "ssh_user_ed25519_key.shared"
    assert shared.read_bytes() == (wd / "ssh_user_ed25519_key").read_bytes()
    before = snapshot(wd)
    prepare.prepare(allowed)
    assert snapshot(wd) == before
    prepare.prepare(config)
    assert layout(wd) == EXPECTED


def test_modes_that_drifted_are_set_again(config: Config) -> None:
    prepare.prepare(config)
    wd = Path(config.working_directory)
    os.chmod(wd, 0o755)
    os.chmod(wd / "ssh_user_ed25519_key", 0o644)
    os.chmod(wd / "vm_sshd_keys", 0o755)
    os.chmod(wd / "diff.img", 0o666)
    prepare.prepare(config)
    assert layout(wd) == EXPECTED


def test_leftovers_of_an_interrupted_run_are_removed(config: Config, image) -> None:
    prepare.prepare(config)
    wd = Path(config.working_directory)
    Path(disk.temporaryName(str(wd / "base.img"))).write_bytes(b"half a copy")
    Path(disk.temporaryName(str(wd / "vm_sshd_keys/ssh_host_ed25519_key"))).write_bytes(b"")
    prepare.prepare(config)
    assert layout(wd) == EXPECTED
    assert_consistent(config, image)


def count_renames(monkeypatch, crash_after: int | None) -> list[str]:
    """Let renames happen, and die right after rename number C{crash_after}."""
    done: list[str] = []
    real = os.rename

    def rename(source, destination):
        real(source, destination)
        done.append(os.path.basename(destination))
        if crash_after is not None and len(done) == crash_after:
            raise Crash()

    monkeypatch.setattr(os, "rename", rename)
    return done


def test_a_crash_after_any_step_is_finished_by_the_next_run(config, image, tmp_path, monkeypatch):
    """
    Whatever step a first run dies after, a rerun completes.  One that died with whole keys
    and no record yet makes new keys, as for any new image, and keeps those it replaces
    (tests/unit/test_rotation.py): a daemon may have booted a VM on them meanwhile.
    """
    with monkeypatch.context() as m:
        renames = count_renames(m, None)
        probe = Config(working_directory=str(tmp_path / "probe"), image=str(image), disk_size=DISK)
        prepare.prepare(probe)
        total = len(renames)
    assert total == 8  # base, diff, five key files, the record

    keeps = []
    for crash_after in range(1, total + 1):
        wd = str(tmp_path / f"fresh{crash_after}")
        final = Config(working_directory=wd, image=str(image), disk_size=DISK)
        with monkeypatch.context() as m:
            count_renames(m, crash_after)
            with pytest.raises(Crash):
                prepare.prepare(final)
        keep = prepare.keysConsistent(final) and prepare.recordedImage(final) is None
        prepare.prepare(final)
        assert_consistent(final, image)
        previous = {PREVIOUS_CLIENT_KEY: 0o600} if keep else {}
        assert layout(Path(wd)) == {**EXPECTED, **previous}
        keeps.append(keep)
    assert keeps == [False] * 6 + [True, False], "only after the keys, before the record"


# -- refusals: one line, nothing touched


def refused(config: Config, owner: str | None = None) -> str:
    with pytest.raises(VirbyError) as caught:
        prepare.prepare(config, owner=owner)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_no_image_is_refused(tmp_path: Path) -> None:
    message = refused(Config(working_directory=str(tmp_path / "wd")))
    assert message == 'image: not set; pass --image or set "image" in the config'
    assert not (tmp_path / "wd").exists()


def test_a_missing_image_is_refused(tmp_path: Path) -> None:
    config = Config(working_directory=str(tmp_path / "wd"), image=str(tmp_path / "nope.img"))
    assert "nope.img" in refused(config)
    assert not (tmp_path / "wd").exists()


def test_an_image_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    config = Config(working_directory=str(tmp_path / "wd"), image=str(tmp_path))
    assert "not a file" in refused(config)
    assert not (tmp_path / "wd").exists()


def test_a_working_directory_that_is_a_file_is_refused(tmp_path: Path, image) -> None:
    (tmp_path / "wd").write_bytes(b"precious")
    message = refused(Config(working_directory=str(tmp_path / "wd"), image=str(image)))
    assert "not a directory" in message
    assert (tmp_path / "wd").read_bytes() == b"precious"


def test_a_working_directory_that_is_not_writable_is_refused(config, monkeypatch) -> None:
    """Root may write anywhere, so the refusal is driven through os.access, which decides it."""
    wd = Path(config.working_directory)
    wd.mkdir()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if path == str(wd) else real(path, mode)
    )
    assert "not writable" in refused(config)
    assert list(wd.iterdir()) == []


def test_an_unknown_owner_is_refused(config: Config) -> None:
    assert "no user" in refused(config, owner="no-such-user-virby")
    assert "no group" in refused(config, owner="root:no-such-group-virby")
    assert not Path(config.working_directory).exists()


def test_a_failure_on_disk_is_one_line(config: Config, monkeypatch) -> None:
    def full(*args):
        raise OSError(28, "No space left on device", "/wd/.base.img.x.virby-tmp")

    monkeypatch.setattr(disk, "_sparseCopy", full)
    monkeypatch.setattr(disk, "platformClone", lambda: None)
    assert "No space left on device" in refused(config)
    assert not [p for p in Path(config.working_directory).iterdir() if p.is_file()]


def test_owner_resolves_names_numbers_and_the_default_group() -> None:
    assert prepare.parseOwner("root") == prepare.Owner(0, 0)
    assert prepare.parseOwner("0:0") == prepare.Owner(0, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_owner_hands_over_the_whole_tree(config: Config) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    wd = Path(config.working_directory)
    prepare.prepare(config)
    (wd / "vfkit.pid").write_text("1\n")  # a runtime file the daemon made earlier
    prepare.prepare(config, owner="nobody")
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [wd, *wd.rglob("*")]}
    assert owners == {(nobody.pw_uid, nobody.pw_gid)}


# -- shared directories: vfkit runs as the daemon's user and stops every boot at a share
# that user cannot reach, so prepare refuses one before touching anything


def sharing(config: Config, **shared: Path | str) -> Config:
    return dataclasses.replace(config, shared_dirs={k: str(v) for k, v in shared.items()})


def test_a_share_in_a_home_folder_is_refused_naming_the_folder_and_the_fix(config, home) -> None:
    with pytest.raises(VirbyError) as caught:
        prepare.prepare(sharing(config, src=home / "src"), ask=PlayedUser(home.parent.parent))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f'shared-dirs: "src" ({home}/src): ')
    assert f"may not search {home} " in message
    # Without --owner the tree stays the caller's: the share is checked as the caller.
    assert f'sudo chmod +a "{shares.Account.caller().name} allow search" {home}' in message
    assert not Path(config.working_directory).exists()


def test_a_share_in_a_privacy_protected_folder_is_refused(config) -> None:
    def never(account, questions):
        raise AssertionError("refused by name, whatever the system would answer")

    with pytest.raises(VirbyError, match="kept from daemons") as caught:
        prepare.prepare(sharing(config, docs="/Users/me/Documents/src"), ask=never)
    assert "/Users/me/Documents" in str(caught.value)
    assert not Path(config.working_directory).exists()


def test_every_unreachable_share_is_counted_in_the_one_line(config, home) -> None:
    shared = sharing(config, a=home / "src", b=home, c="/Users/me/Desktop")
    with pytest.raises(VirbyError) as caught:
        prepare.prepare(shared, ask=PlayedUser(home.parent.parent))
    assert str(caught.value).startswith('shared-dirs: "a" ')
    assert str(caught.value).endswith("(2 more shared directories too)")


def test_a_reachable_share_is_prepared_and_a_second_run_changes_nothing(config, home) -> None:
    home.chmod(0o755)
    played = PlayedUser(home.parent.parent)
    shared = sharing(config, src=home / "src")
    prepare.prepare(shared, ask=played)
    wd = Path(config.working_directory)
    before = snapshot(wd)
    prepare.prepare(shared, ask=played)
    assert snapshot(wd) == before
    assert len(played.asked) == 2


def test_what_an_acl_allows_beyond_the_modes_is_not_refused(config, home) -> None:
    """The home is drwxr-x---, but the system, which sees ACLs, lets the user through."""
    prepare.prepare(
        sharing(config, src=home / "src"), ask=lambda account, asked: [True] * len(asked)
    )
    assert Path(config.working_directory, "diff.img").exists()


def test_a_missing_share_or_one_that_cannot_be_asked_about_only_warns(config, home) -> None:
    warnings: list[str] = []

    def not_root(account, questions):
        raise shares.CannotAsk("only root can ask what _virby may reach")

    shared = sharing(config, gone=home / "gone", src=home / "src")
    prepare.prepare(shared, warn=warnings.append, ask=not_root)
    assert warnings[0].startswith(f'shared-dirs: "gone" ({home}/gone): it does not exist')
    assert warnings[1] == (
        "shared-dirs: not checked: only root can ask what _virby may reach; "
        "run `sudo virby doctor` later"
    )
    assert Path(config.working_directory, "diff.img").exists()


def test_the_shares_are_asked_about_as_the_owner_the_tree_goes_to(config, home) -> None:
    asked: list[shares.Account] = []

    def record(account, questions):
        asked.append(account)
        raise shares.AskFailed("recorded")

    prepare.prepare(sharing(config, src=home / "src"), ask=record, warn=lambda m: None)
    assert asked[-1].uid == os.geteuid()  # without --owner the tree stays the caller's
    shared = sharing(config, src=home / "src")
    with pytest.raises(VirbyError, match="no user"):
        prepare.prepare(shared, owner="no-such-user-virby", ask=record)
    assert len(asked) == 1


def test_cli_refuses_an_unreachable_share_in_one_line(short_tmp: Path, image, capsys) -> None:
    wd = short_tmp / "wd"
    argv = ["prepare", "--working-directory", str(wd), "--image", str(image),
            "--shared-dirs", "src=/Users/me/Downloads/src"]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('virby prepare: error: shared-dirs: "src" (/Users/me/Downloads/src): ')
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not wd.exists()


# -- the command


def test_cli_refusals_are_one_line_and_exit_1(tmp_path: Path, image, capsys) -> None:
    (tmp_path / "file").write_bytes(b"x")
    wd = str(tmp_path / "wd")
    cases = [
        ["--working-directory", wd, "--image", str(tmp_path / "missing.img")],
        ["--working-directory", wd, "--image", str(image), "--disk-size", "lots"],
        ["--working-directory", str(tmp_path / "file"), "--image", str(image)],
        ["--working-directory", wd],
    ]
    for flags in cases:
        assert cli.main(["prepare", *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("virby prepare: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "wd").exists()
    assert (tmp_path / "file").read_bytes() == b"x"


def test_cli_prepares_and_reports_what_it_did(short_tmp: Path, image, capsys) -> None:
    wd = short_tmp / "wd"
    argv = ["prepare", "--working-directory", str(wd), "--image", str(image), "--disk-size", "1GiB"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "made new SSH keys" in out and "grew diff.img" in out
    assert layout(wd) == EXPECTED
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == ""


def test_print_ssh_config_prints_the_block_and_touches_nothing(short_tmp: Path, capsys) -> None:
    wd = short_tmp / "wd"
    argv = ["prepare", "--working-directory", str(wd), "--port", "31333", "--print-ssh-config"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Host virby-vm\n") and "  Port 31333\n" in out
    assert f"  IdentityFile {wd}/ssh_user_ed25519_key\n" in out
    assert not wd.exists()


def test_the_command_asks_the_daemon_to_move_and_prints_its_answer(short_tmp, image, capsys):
    """Once prepared, the running daemon is asked to move to what prepare made."""
    config = Config(working_directory=str(short_tmp / "wd"), image=str(image), disk_size=DISK)
    asked: list[bool] = []

    def ask(asking: Config) -> str | None:
        assert asking is config
        asked.append(prepare.recordedImage(asking) == str(image))
        return "the daemon moves to the new image once no build uses the VM"

    assert prepare.run(config, None, False, askToRenew=ask) == 0
    assert asked == [True], "asked once, after the directory was prepared"
    out = capsys.readouterr().out
    assert out.endswith(
        "virby prepare: the daemon moves to the new image once no build uses the VM\n"
    )
    assert prepare.run(config, None, False, askToRenew=lambda asking: None) == 0
    assert capsys.readouterr().out == "", "no answer, nothing printed"


def test_print_ssh_config_asks_the_daemon_nothing(short_tmp, capsys) -> None:
    def ask(config: Config) -> str | None:
        raise AssertionError("only the block is printed")

    config = Config(working_directory=str(short_tmp / "wd"))
    assert prepare.run(config, None, True, askToRenew=ask) == 0
    assert capsys.readouterr().out.startswith("Host virby-vm\n")
