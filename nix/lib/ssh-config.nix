# The Host block installed as /etc/ssh/ssh_config.d/100-virby-vm.conf; the same text as
# `virby ssh-config` and `virby prepare --print-ssh-config` (virby.sshconfig).  Pure.
#
# With allowUserSsh, the identity is the copy of the client key that `virby prepare` makes
# readable by every local user: the private key itself stays 0600 and _virby's, so any other
# user's ssh could not read it.  The second IdentityFile is the client key of the set before a
# new image, for a VM still running that image (virby/rotation.py); ssh passes over it quietly
# when it is missing, as it is most of the time (virby/sshconfig.py says why).
{
  port,
  allowUserSsh ? false,
  workingDirectory ? "/var/lib/virby",
}:
let
  identity = "${workingDirectory}/ssh_user_ed25519_key${if allowUserSsh then ".shared" else ""}";
in
''
  Host virby-vm
    HostName 127.0.0.1
    Port ${toString port}
    User builder
    HostKeyAlias virby-vm-key
    IdentityFile ${identity}
    IdentityFile ${identity}.previous
    UserKnownHostsFile ${workingDirectory}/ssh_known_hosts
    StrictHostKeyChecking yes
    IdentitiesOnly yes
''
