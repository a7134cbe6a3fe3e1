# Evaluates the nix-darwin module with lib.evalModules against stand-ins for the few
# nix-darwin options it sets, so its launchd daemon, ssh config and build machines can be
# checked without a Mac.  Needs nixpkgs (for lib).
#
#   nix-instantiate --eval --strict --json nix/tests/eval-module.nix --arg settings '{...}'
{
  nixpkgs ? <nixpkgs>,
  settings ? { },
  system ? "aarch64-darwin",
}:
let
  lib = import (nixpkgs + "/lib");
  anything = lib.mkOption { type = lib.types.anything; default = null; };
  stubs =
    { lib, ... }:
    {
      options = {
        assertions = lib.mkOption {
          type = lib.types.listOf lib.types.unspecified;
          default = [ ];
        };
        users.users = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
        users.groups = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
        users.knownUsers = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; };
        users.knownGroups = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; };
        system.activationScripts = lib.mkOption {
          type = lib.types.attrsOf (
            lib.types.submodule { options.text = lib.mkOption { type = lib.types.lines; default = ""; }; }
          );
          default = { };
        };
        launchd.daemons = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
        environment.etc = lib.mkOption {
          type = lib.types.attrsOf (
            lib.types.submodule { options.text = lib.mkOption { type = lib.types.lines; }; }
          );
          default = { };
        };
        environment.systemPackages = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
        nix.buildMachines = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
        nix.distributedBuilds = lib.mkOption { type = lib.types.bool; default = false; };
      };
    };
  # Stand-ins for what would be built: the image, vfkit and the package.
  fakeNixpkgs = {
    lib.nixosSystem = _: { config.system.build.virbyImage = "/nix/store/0000-virby-vm-image"; };
  };
  pkgs = {
    stdenv.hostPlatform.system = system;
    vfkit = "/nix/store/0000-vfkit";
    writeText = name: text: "/nix/store/0000-${name}";
  };
  module = import ../module.nix {
    nixpkgs = fakeNixpkgs;
    virbyPackage = _: "/nix/store/0000-virby";
  };
  evaluated = lib.evalModules {
    modules = [
      stubs
      module
      { services.virby = { enable = true; } // settings; }
    ];
    specialArgs = { inherit pkgs; };
  };
  config = evaluated.config;
  failed = builtins.filter (a: !a.assertion) config.assertions;
in
{
  assertions = map (a: a.message) failed;
  daemon = config.launchd.daemons.virbyd.serviceConfig;
  daemonConfig = config.services.virby.settings;
  sshConfig = config.environment.etc."ssh/ssh_config.d/100-virby-vm.conf".text;
  buildMachines = config.nix.buildMachines;
  users = builtins.attrNames config.users.users;
}
