# services.virby inside a real nix-darwin system: nix-darwin's own modules, nixpkgs' real
# lib, and the stand-in package set of stub-pkgs.nix (no full nixpkgs is needed, and the
# NixOS image is replaced by a stand-in derivation that records what the module asked of it).
# The module comes from this repository's flake, as a user imports it.
#
#   nix-instantiate --eval --strict --json --readonly-mode nix/tests/darwin.nix \
#     --arg nixDarwin /path/to/nix-darwin --arg nixpkgsLib /path/to/nixpkgs-lib/lib \
#     [--arg determinate /path/to/determinate] --argstr cases '{"name": {...}, ...}'
#
# Each case is { system ? "aarch64-darwin", virby ? {...services.virby...},
# determinate ? false, config ? {...more nix-darwin options...}, packageVersion ? null } (a
# version makes services.virby.package the default package at that version: another store
# path); the result has, per case,
# what nix-darwin made of it (see `report`).  `systems.<case>` holds the evaluated systems,
# for building with nix-build; `verdicts.<case>` whether the module takes the case at all,
# and `checked.<case>` the daemon's config, or the error that refuses it.
{
  nixDarwin,
  nixpkgsLib,
  determinate ? null,
  cases ? "{}",
}:
let
  lib = import ./nixpkgs-lib.nix nixpkgsLib;
  caseSet = if builtins.isString cases then builtins.fromJSON cases else cases;

  imageFile = ../image.nix;

  # What the module asked of the image: the settings it passed and the rest of the NixOS
  # modules (extraConfig), read with a module evaluation that accepts any option.
  stubNixosSystem =
    { system, modules, ... }:
    let
      evaluated = lib.evalModules {
        modules = builtins.filter (m: m != imageFile) modules ++ [
          { freeformType = lib.types.attrsOf lib.types.anything; }
        ];
        specialArgs = {
          pkgs = stubPkgs system;
          modulesPath = "/stub/nixos/modules";
        };
      };
      settings = evaluated.config.virby.image or { };
      rest = lib.generators.toPretty { } (
        builtins.removeAttrs evaluated.config [
          "_module"
          "virby"
        ]
      );
      imageModuleIncluded = builtins.elem imageFile modules;
    in
    {
      config.system.build.virbyImage =
        (stubPkgs system).runCommand "virby-vm-image"
          {
            imageSettings = builtins.toJSON settings;
            extraConfig = rest;
            passthru = { inherit settings rest imageModuleIncluded; };
          }
          ''
            mkdir -p $out
            truncate -s 4M $out/nixos.img
          '';
    };

  stubPkgs = system: import ./stub-pkgs.nix { inherit lib system; };

  nixpkgs = {
    lib = lib // {
      nixosSystem = stubNixosSystem;
    };
    # As nixpkgs 26.11 does: any x86_64-darwin package throws.
    legacyPackages =
      lib.genAttrs [
        "aarch64-darwin"
        "aarch64-linux"
        "x86_64-linux"
      ] stubPkgs
      // {
        x86_64-darwin = throw "Nixpkgs 26.11 has dropped support for x86_64-darwin";
      };
    outPath = "/stub/nixpkgs";
  };

  flake =
    let
      outputs = (import ../../flake.nix).outputs {
        self = outputs;
        inherit nixpkgs;
      };
    in
    outputs;

  darwin =
    let
      outputs = (import (nixDarwin + "/flake.nix")).outputs {
        self = outputs;
        inherit nixpkgs;
      };
    in
    outputs;

  evalCase =
    name: case:
    let
      system = case.system or "aarch64-darwin";
    in
    darwin.lib.darwinSystem {
      pkgs = stubPkgs system;
      modules = [
        flake.darwinModules.default
        {
          nixpkgs.hostPlatform = system;
          system.stateVersion = 6;
          system.primaryUser = "alice";
          # The uninstaller evaluates a second nix-darwin system from nixpkgs' own source
          # tree, which the stand-in package set does not have.
          system.tools.darwin-uninstaller.enable = false;
          # The HTML manual copies nixpkgs' doc/ sources, which nixpkgs' lib does not have.
          documentation.doc.enable = false;
          services.virby = case.virby or { };
        }
        (case.config or { })
        (
          { options, ... }:
          lib.optionalAttrs (case ? packageVersion) {
            services.virby.package = options.services.virby.package.default.overrideAttrs {
              version = case.packageVersion;
            };
          }
        )
      ] ++ lib.optional (case.determinate or false) (determinate + "/modules/nix-darwin/default.nix");
    };

  systems = builtins.mapAttrs evalCase caseSet;

  report =
    name: evaluated:
    let
      config = evaluated.config;
      failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
      etcText = path: if config.environment.etc ? ${path} then config.environment.etc.${path}.text else null;
      plistName = "org.nixos.virbyd.plist";
      virby = config.services.virby;
    in
    {
      assertions = failed;
      warnings = config.warnings;
      drvPath = if failed == [ ] then config.system.build.toplevel.drvPath else null;
      systemPath = if failed == [ ] then config.system.build.toplevel.outPath else null;
      plist =
        if config.environment.launchDaemons ? ${plistName} then
          config.environment.launchDaemons.${plistName}.text
        else
          null;
      machines = etcText "nix/machines";
      nixSettings =
        if config.nix.enable then
          { builders-use-substitutes = config.nix.settings.builders-use-substitutes or null; }
        else
          null;
      determinateConf = etcText "nix/nix.custom.conf";
      distributedBuilds = if config.nix.enable then config.nix.distributedBuilds else null;
      sshConfig = etcText "ssh/ssh_config.d/100-virby-vm.conf";
      stage0SshConfig = etcText "ssh/ssh_config.d/100-virby-stage0.conf";
      # The runner prepare may start as stage 0: its derivation, like the image's, may be in
      # the system's closure, but no derivation of the system may take its output.
      stage0Runner =
        if virby.enable && virby.stage0 then
          builtins.unsafeDiscardStringContext
            evaluated.pkgs.darwin.linux-builder.nixosConfig.system.build.vm.drvPath
        else
          null;
      newsyslog = etcText "newsyslog.d/org.nixos.virbyd.conf";
      configLink =
        if config.environment.etc ? "virby/config.json" then
          "${config.environment.etc."virby/config.json".source}"
        else
          null;
      programLink =
        if config.environment.etc ? "virby/virbyd" then
          "${config.environment.etc."virby/virbyd".source}"
        else
          null;
      activate = config.system.activationScripts.script.text;
      enableDescription = evaluated.options.services.virby.enable.description;
      settings = if virby.enable then virby.settings else null;
      package =
        if virby.enable then
          "${virby.package or (evaluated.pkgs.callPackage ../package.nix { })}"
        else
          null;
      # What the package expression asked of nixpkgs' Python builder.
      packageCheck =
        let
          args = (virby.package or { stubArgs = { }; }).stubArgs;
        in
        if virby.enable then
          {
            enabledTestPaths = args.enabledTestPaths or null;
            pytestFlagsArray = args.pytestFlagsArray or null;
            disabledTestMarks = args.disabledTestMarks or null;
            darwinAllowLocalNetworking = args.__darwinAllowLocalNetworking or false;
            postInstall = args.postInstall or null;
          }
        else
          null;
      image =
        if virby.enable && config.system.build ? virbyImage then
          {
            path = "${config.system.build.virbyImage}";
            # The image's derivation, which the system's closure may hold (its .drv file)
            # but whose output no derivation of the system may take as an input.
            drvPath = builtins.unsafeDiscardStringContext config.system.build.virbyImage.drvPath;
            inherit (config.system.build.virbyImage) settings rest imageModuleIncluded;
          }
        else
          null;
    };
  # What the module settles at evaluation for a case: the daemon's config and the failed
  # assertions.  A value the module refuses throws here, with a message naming the option.
  checked =
    name: evaluated:
    let
      config = evaluated.config;
    in
    {
      settings = config.services.virby.settings;
      assertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
    };

  # Whether the module takes a case: it neither throws nor fails an assertion.  tryEval
  # keeps no message, so that every case fits in one evaluation; `checked` has the message.
  verdict =
    name: evaluated:
    let
      tried = builtins.tryEval (
        let
          c = checked name evaluated;
        in
        builtins.deepSeq c c
      );
    in
    tried.success && tried.value.assertions == [ ];
in
{
  inherit systems flake;
  results = builtins.mapAttrs report systems;
  # The flake's formatter, as `nix fmt` would take it on each system.
  formatters = builtins.mapAttrs (_: formatter: formatter.pname) flake.formatter;
  checked = builtins.mapAttrs checked systems;
  verdicts = builtins.mapAttrs verdict systems;
  # The flake's per-system outputs, each as the systems it has, and the derivations of its
  # packages and checks, all evaluated as `nix flake check` does: on the stand-in nixpkgs,
  # which throws at x86_64-darwin as nixpkgs 26.11 does.
  flakeOutputs =
    let
      drvPaths = builtins.mapAttrs (_: builtins.mapAttrs (_: drv: drv.drvPath));
    in
    {
      systems = lib.genAttrs [
        "packages"
        "checks"
        "devShells"
        "formatter"
      ] (output: builtins.attrNames flake.${output});
      packages = drvPaths flake.packages;
      checks = drvPaths flake.checks;
    };
  # The flake's check of the pure parts, on this machine's system: the command it runs, and
  # its derivation (instantiating it puts the sources it names into the store).
  pureCheck =
    let
      check = flake.checks.${builtins.currentSystem}.pure;
    in
    {
      inherit (check) buildCommand drvPath;
    };
}
