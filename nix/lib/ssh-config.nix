# The Host block installed as /etc/ssh/ssh_config.d/100-virby-vm.conf; the same text as
# `virby prepare --print-ssh-config` (virby.sshconfig).  Pure.
{
  port,
  workingDirectory ? "/var/lib/virby",
}:
''
  Host virby-vm
    HostName 127.0.0.1
    Port ${toString port}
    User builder
    HostKeyAlias virby-vm-key
    IdentityFile ${workingDirectory}/ssh_user_ed25519_key
    UserKnownHostsFile ${workingDirectory}/ssh_known_hosts
    StrictHostKeyChecking yes
    IdentitiesOnly yes
''
