# The VM image's NixOS configuration (nix/image.nix) evaluated with nixpkgs' real lib and
# module system, but without NixOS' modules (there is no full nixpkgs on the test machines):
# every option the image sets is taken as it is written, except the few whose declarations
# the image reads, which are declared here as nixpkgs declares them.
#
#   nix-instantiate --eval --strict --json --readonly-mode nix/tests/image.nix \
#     --arg nixpkgsLib /path/to/nixpkgs-lib/lib [--arg generateHostKeys false] \
#     [--argstr extraConfig '{"networking": {"useNetworkd": true}}']
#
# generateHostKeys plays a nixpkgs whose sshd module declares services.openssh.generateHostKeys
# (late 2025 on) or one that does not; extraConfig is a user's services.virby.extraConfig.
{
  nixpkgsLib,
  generateHostKeys ? true,
  extraConfig ? "{}",
}:
let
  lib = import ./nixpkgs-lib.nix nixpkgsLib;
  evaluated = lib.evalModules {
    modules = [
      ../image.nix
      { freeformType = lib.types.lazyAttrsOf lib.types.anything; }
      # nixos/modules/tasks/network-interfaces.nix
      {
        options.networking.useNetworkd = lib.mkOption {
          type = lib.types.bool;
          default = false;
        };
      }
      # nixos/modules/services/networking/ssh/sshd.nix
      (lib.optionalAttrs generateHostKeys {
        options.services.openssh.generateHostKeys = lib.mkOption {
          type = lib.types.bool;
          default = true;
        };
      })
      (builtins.fromJSON extraConfig)
    ];
    specialArgs = {
      modulesPath = toString ./nixos-modules;
      pkgs = { };
    };
  };
  config = evaluated.config;
  keyUnit = config.systemd.services.virby-install-keys;
in
{
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  sshd = {
    inherit (config.services.openssh) settings hostKeys;
    generateHostKeys = config.services.openssh.generateHostKeys or null;
    keygenUnit = config.systemd.services.sshd-keygen or null;
  };
  nixpkgsFlake = config.nixpkgs.flake;
  channel = config.nix.channel.enable;
  disableInstallerTools = config.system.disableInstallerTools;
  keyScript = keyUnit.script;
}
