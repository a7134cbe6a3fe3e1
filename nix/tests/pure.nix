# Evaluates the pure parts for a default and a non-default option set (used by the flake's
# checks; the Python tests evaluate lib/ directly with more cases).
let
  config = import ../lib/config.nix;
  options = {
    cores = 8;
    memory = 6144;
    diskSize = "100GiB";
    port = 31222;
    onDemand = {
      enable = false;
      ttl = 180;
    };
    rosetta = false;
    nestedVirtualization = false;
    sharedDirectories = { };
    debug = false;
    allowUserSsh = false;
    ephemeral = false;
  };
in
{
  default = config {
    cfg = options;
    image = "/nix/store/0000-image/nixos.img";
    vfkit = "/nix/store/0000-vfkit/bin/vfkit";
  };
  custom = config {
    cfg = options // {
      memory = "8GiB";
      onDemand = {
        enable = true;
        ttl = 30;
      };
      sharedDirectories.src = "/Users/me/src";
      ephemeral = true;
    };
    image = "/nix/store/0000-image/nixos.img";
    vfkit = "/nix/store/0000-vfkit/bin/vfkit";
  };
}
