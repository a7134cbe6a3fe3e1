"""
The SSH keys that let the host reach the VM: made with C{cryptography}, in OpenSSH format.

Two ed25519 pairs exist.  The VM's host key is shared into the guest (it would otherwise
invent one at every boot, and the host could never pin it), and its public half is pinned in
C{ssh_known_hosts} under the alias C{virby-vm-key}.  The client key is what the host's
C{ssh virby-vm} logs in with; its public half is shared into the guest as the builder's
authorized key.  While a VM booted on the set before may still run, that set's host key is
pinned too, on the second line (L{virby.rotation}).  Generating them here, with no
C{ssh-keygen}, keeps C{virby prepare} free of any tool that a Mac might lack or ship in an
old version.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

#: The name the host's ssh knows the VM's key by, whatever address the VM got this boot.
HOST_KEY_ALIAS = "virby-vm-key"


@dataclass(frozen=True)
class KeyPair:
    """
    One ed25519 key pair, ready to be written to files.

    @ivar private: the private key as an OpenSSH PEM block (C{-----BEGIN OPENSSH PRIVATE KEY}).
    @ivar public: the public key as one C{authorized_keys} line without newline, e.g.
        C{"ssh-ed25519 AAAA... virby-client"}.
    """

    private: bytes
    public: str


def generate(comment: str) -> KeyPair:
    """Make a new ed25519 pair; C{comment} ends the public line, naming what the key is for."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return KeyPair(private=private, public=f"{public.decode('ascii')} {comment}")


def publicOfPrivate(private: bytes) -> str:
    """
    The bare public key (C{"ssh-ed25519 AAAA..."}, no comment) of an OpenSSH private key.

    @raise ValueError: when C{private} is not an unencrypted OpenSSH private key.
    """
    key = serialization.load_ssh_private_key(private, password=None)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode("ascii")


def barePublic(line: str) -> str:
    """
    The key type and key of a public key line, without comment or known_hosts host names,
    so two lines can be compared for the key they hold.

    @raise ValueError: when C{line} holds no C{ssh-...} key.
    """
    words = line.split()
    for index, word in enumerate(words[:-1]):
        if word.startswith("ssh-"):
            bare = f"{word} {words[index + 1]}"
            serialization.load_ssh_public_key(bare.encode("ascii"))
            return bare
    raise ValueError(f"no public key in {line!r}")


def knownHostsLine(public: str, alias: str = HOST_KEY_ALIAS) -> str:
    """The C{ssh_known_hosts} line that pins C{public} under C{alias} (with newline)."""
    return f"{alias} {barePublic(public)}\n"


def pinnedKeys(knownHosts: str, alias: str = HOST_KEY_ALIAS) -> list[str] | None:
    """
    The bare keys a C{ssh_known_hosts} written by Virby pins, in order: the current host key,
    then, while it is kept, the previous one.  OpenSSH accepts a host key that any line for
    the alias pins, so both VMs pass the strict check during a transition.

    @return: C{None} unless C{knownHosts} is exactly one or two L{knownHostsLine}s under
        C{alias}, each with a valid and distinct key: anything else was not written whole.
    """
    lines = knownHosts.splitlines(keepends=True)
    if not 1 <= len(lines) <= 2:
        return None
    pinned = []
    for line in lines:
        try:
            bare = barePublic(line)
        except ValueError:
            return None
        if line != knownHostsLine(bare, alias):
            return None
        pinned.append(bare)
    return pinned if len(set(pinned)) == len(pinned) else None
