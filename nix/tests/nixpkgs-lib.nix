# nixpkgs' lib from a checkout of it (its `lib/` folder), for the tests that evaluate the
# module inside a real nix-darwin.
#
# nixpkgs' lib since late 2025 calls `builtins.readFileType` (Nix 2.14), and Debian 12 ships
# Nix 2.8.  When the running Nix lacks it, the lib is loaded with `scopedImport` under a
# `builtins` that has it: a readFileType written from `builtins.readDir` of the parent
# directory (which reports the same "regular", "directory", "symlink" or "unknown").  The
# replacement `import` carries that `builtins` into every file the lib, the module system and
# the modules it loads import in turn.  Nothing of this reaches the project's own Nix code,
# which runs under whatever Nix the user has.
libDir:
let
  readFileType =
    path:
    let
      parent = dirOf path;
    in
    if parent == path then "directory" else (builtins.readDir parent).${baseNameOf path};
  patched = builtins // {
    inherit readFileType;
    import = importPatched;
    scopedImport = scope: importScoped ({ builtins = patched; import = importPatched; } // scope);
  };
  importScoped = scope: path: scopedImport scope path;
  importPatched = importScoped {
    builtins = patched;
    import = importPatched;
  };
in
if builtins ? readFileType then import libDir else importPatched libDir
