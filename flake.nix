{
  description = "Virby: an on-demand Linux builder VM for Nix on macOS";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixpkgs-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # nixpkgs 26.11 dropped x86_64-darwin: evaluating any of its packages throws.
      darwinSystems = [ "aarch64-darwin" ];
      linuxSystems = [
        "aarch64-linux"
        "x86_64-linux"
      ];
      forSystems = systems: f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      allSystems = darwinSystems ++ linuxSystems;
      package = pkgs: pkgs.callPackage ./nix/package.nix { };
      vmImage =
        system:
        (lib.nixosSystem {
          inherit system;
          modules = [ ./nix/image.nix ];
        }).config.system.build.virbyImage;
    in
    {
      darwinModules.virby = import ./nix/module.nix {
        inherit nixpkgs;
        virbyPackage = package;
      };
      darwinModules.default = self.darwinModules.virby;

      packages = lib.recursiveUpdate (forSystems darwinSystems (pkgs: {
        default = package pkgs;
      })) (forSystems linuxSystems (pkgs: {
        default = package pkgs;
        vm-image = vmImage pkgs.stdenv.hostPlatform.system;
      }));

      checks = forSystems allSystems (pkgs: {
        # The package's build runs the unit tests.
        package = package pkgs;
        # The pure parts evaluate and agree with the daemon's expectations.  The whole nix/
        # folder goes into the store, since pure.nix imports ../lib/; the dummy store lets
        # Nix evaluate inside the build sandbox, where it cannot open the real one.
        pure = pkgs.runCommand "virby-pure-nix" { } ''
          ${pkgs.nix}/bin/nix-instantiate --eval --strict --json --store dummy:// \
            ${./nix}/tests/pure.nix > $out
        '';
      });

      devShells = forSystems allSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps: with ps; [
                twisted
                service-identity
                pyopenssl
                cryptography
                pytest
                pytest-twisted
                hypothesis
                mypy
                mypy-zope
              ]
            ))
            pkgs.ruff
            pkgs.openssh
            pkgs.socat
          ];
        };
      });

      # nixfmt is the RFC 166 formatter; nixfmt-rfc-style is now a deprecated alias of it.
      formatter = forSystems allSystems (pkgs: pkgs.nixfmt);
    };
}
