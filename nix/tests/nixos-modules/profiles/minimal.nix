# Stands for nixpkgs' nixos/modules/profiles/minimal.nix, which nix/image.nix imports: the
# image's own settings are what nix/tests/image.nix looks at, and nixpkgs' NixOS modules are
# not on the test machines.
{ }
