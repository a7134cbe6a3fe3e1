# What the daemon's config loader (virby/config.py) takes, so that the module refuses at
# evaluation, naming the option, what the daemon would refuse at start.  The loader is the
# source: tests/unit/test_nix_bounds.py checks every bound here against it, with the value
# just inside and just outside.  Pure: needs no nixpkgs.
{
  cores = {
    min = 1;
    max = 256;
  };
  port = {
    min = 1024;
    max = 65535;
  };
  # MiB: 1 GiB to 1 TiB.
  memory = {
    min = 1024;
    max = 1048576;
  };
  # Bytes: 1 GiB to 64 TiB.
  diskSize = {
    min = 1073741824;
    max = 70368744177664;
  };
  # Seconds: 1 s to 365 days.
  ttl = {
    min = 1;
    max = 31536000;
  };
  # Virtualization.framework takes a virtio-fs tag of fewer than 36 bytes.
  shareTagBytes = 35;
  shares = 64;
  # The tags of the shares Virby makes itself.
  reservedTags = [
    "sshd-keys"
    "rosetta"
  ];
  # macOS's PATH_MAX (1024) counts the terminating NUL.
  pathBytes = 1023;
  # A number written with more digits than this (leading zeros too) is refused unread.
  digits = 20;
}
