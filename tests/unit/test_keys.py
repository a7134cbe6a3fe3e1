"""The SSH keys made for the VM and its client, checked by parsing them back."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from virby import keys


def test_generate_makes_an_openssh_ed25519_pair_whose_halves_match() -> None:
    pair = keys.generate("virby-client")
    private = serialization.load_ssh_private_key(pair.private, password=None)
    assert isinstance(private, Ed25519PrivateKey)
    assert pair.private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    kind, blob, comment = pair.public.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "virby-client")
    assert keys.publicOfPrivate(pair.private) == f"{kind} {blob}"


def test_every_pair_is_new() -> None:
    assert keys.generate("a").public.split()[1] != keys.generate("a").public.split()[1]


def test_public_of_private_refuses_what_is_not_a_private_key() -> None:
    with pytest.raises(ValueError):
        keys.publicOfPrivate(b"not a key")


def test_bare_public_drops_comments_and_host_names() -> None:
    pair = keys.generate("some comment")
    bare = keys.publicOfPrivate(pair.private)
    assert keys.barePublic(pair.public) == bare
    assert keys.barePublic(f"virby-vm-key {bare}") == bare


@pytest.mark.parametrize("line", ["", "virby-vm-key", "ssh-ed25519", "ssh-ed25519 AAAAnotbase64!"])
def test_bare_public_refuses_lines_without_a_valid_key(line: str) -> None:
    with pytest.raises(ValueError):
        keys.barePublic(line)


def test_known_hosts_line_pins_the_key_under_the_alias() -> None:
    pair = keys.generate("virby-vm-host")
    line = keys.knownHostsLine(pair.public)
    assert line == f"virby-vm-key {keys.publicOfPrivate(pair.private)}\n"
    assert keys.knownHostsLine(pair.public, alias="other").startswith("other ssh-ed25519 ")
