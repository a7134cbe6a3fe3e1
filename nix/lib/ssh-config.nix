# The Host block installed as /etc/ssh/ssh_config.d/100-virby-vm.conf; the same text as
# `virby ssh-config` and `virby prepare --print-ssh-config` (virby.sshconfig).  Pure.
#
# With allowUserSsh, the identity is the copy of the client key that `virby prepare` makes
# readable by every local user: the private key itself stays 0600 and _virby's, so any other
# user's ssh could not read it.
{
  port,
  allowUserSsh ? false,
  workingDirectory ? "/var/lib/virby",
}:
''
  Host virby-vm
    HostName 127.0.0.1
    Port ${toString port}
    User builder
    HostKeyAlias virby-vm-key
    IdentityFile ${workingDirectory}/ssh_user_ed25519_key${if allowUserSsh then ".shared" else ""}
    UserKnownHostsFile ${workingDirectory}/ssh_known_hosts
    StrictHostKeyChecking yes
    IdentitiesOnly yes
''
