# The daemon's JSON config from the module's option values: the one place the module and
# virby.config meet.  Pure (no nixpkgs), so tests evaluate it offline and load the result
# with the Python loader.
#
#   import ./config.nix { cfg = config.services.virby; image = "/nix/store/...img";
#                         vfkit = "/nix/store/.../bin/vfkit"; }
{
  cfg,
  image,
  vfkit,
  workingDirectory ? "/var/lib/virby",
}:
let
  size = import ./size.nix;
  sharedDirs = import ./shared-dirs.nix;
in
{
  cores = cfg.cores;
  memory = size.memoryMiB cfg.memory;
  disk-size = size.diskSize cfg.diskSize;
  port = cfg.port;
  listen = "launchd:name=Listener";
  on-demand = cfg.onDemand.enable;
  ttl = cfg.onDemand.ttl * 60;
  rosetta = cfg.rosetta;
  nested-virtualization = cfg.nestedVirtualization;
  shared-dirs = sharedDirs cfg.sharedDirectories;
  debug = cfg.debug;
  allow-user-ssh = cfg.allowUserSsh;
  working-directory = workingDirectory;
  inherit image vfkit;
  leases-file = "/var/db/dhcpd_leases";
  guest-ssh-port = 22;
  start-timeout = 180;
  ephemeral = cfg.ephemeral;
}
