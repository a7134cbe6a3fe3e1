# A stand-in for nixpkgs' package set, just large enough for a nix-darwin system with
# services.virby to evaluate: there is no full nixpkgs on the test machines (only its lib),
# and nothing here is meant to be run on a Mac.
#
# Every package is a real derivation, so `system.build.toplevel.drvPath` instantiates and
# changes with everything the module puts into the system.  The derivations can also be
# built on the Linux machine that runs the tests (`nix-build`, no sandbox): builders are
# /bin/bash with the host's tools, the "programs" of a package are symlinks to
# /standins/<name> (which the activation test provides inside its fake root), and
# nix-darwin's own builders (/etc, the launchd plists, the toplevel with its `activate`)
# run as written.
{
  lib,
  system,
  # The Linux system the derivations are built on.
  buildSystem ? builtins.currentSystem,
}:
let
  builderScript = builtins.toFile "stub-builder.sh" ''
    set -eo pipefail
    export PATH="$stubPath''${stubPath:+:}/usr/bin:/bin"
    # The one nixpkgs setup function nix-darwin's toplevel builder calls.
    substituteInPlace() {
      local file=$1
      shift
      while [ $# -gt 0 ]; do
        case $1 in
          --subst-var) sed -i "s|@$2@|''${!2}|g" "$file"; shift 2 ;;
          *) echo "stub substituteInPlace: $1 is not supported" >&2; exit 1 ;;
        esac
      done
    }
    if [ -n "''${buildCommand:-}" ]; then
      eval "$buildCommand"
    else
      mkdir -p "$out"
      eval "''${installPhase:-}"
    fi
  '';

  # Attribute values as a derivation's environment: derivations and paths as their store
  # paths, other attribute sets as JSON, functions dropped.
  toEnv =
    value:
    if lib.isDerivation value then
      value
    else if builtins.isList value then
      map toEnv value
    else if builtins.isAttrs value then
      builtins.toJSON value
    else
      value;

  notEnv = [
    "passthru"
    "meta"
    "nativeBuildInputs"
    "buildInputs"
    "propagatedBuildInputs"
    "nativeCheckInputs"
    "checkInputs"
    "dependencies"
    "build-system"
  ];

  mkDerivation =
    argsOrFun:
    let
      args = if builtins.isFunction argsOrFun then argsOrFun args else argsOrFun;
      name = args.name or "${args.pname}-${args.version}";
      inputs =
        (args.nativeBuildInputs or [ ]) ++ (args.buildInputs or [ ]) ++ (args.nativeCheckInputs or [ ]);
      env = lib.mapAttrs (_: toEnv) (
        lib.filterAttrs (n: v: !(builtins.isFunction v) && !(builtins.elem n notEnv)) args
      );
      drv = derivation (
        env
        // {
          inherit name;
          system = buildSystem;
          builder = "/bin/bash";
          args = [ builderScript ];
          stubPath = lib.makeBinPath (builtins.filter lib.isDerivation inputs);
        }
      );
    in
    drv
    // (args.passthru or { })
    // {
      inherit name;
      pname = args.pname or (builtins.parseDrvName name).name;
      version = args.version or (builtins.parseDrvName name).version;
      meta = args.meta or { };
      # What mkDerivation passed on, for tests that check a package expression's arguments.
      stubArgs = args;
      overrideAttrs = f: mkDerivation (args // (if builtins.isFunction f then f args else f));
    };

  # A package whose programs are /standins/<name>.
  mkPackage =
    name:
    {
      programs ? [ ],
      # Programs that are the build machine's own (/usr/bin/<name>): the GNU tools.
      hostPrograms ? [ ],
      version ? "1.0",
      # More of the package's contents, as shell commands.
      contents ? "",
      extra ? { },
    }:
    mkDerivation (
      {
        pname = name;
        inherit version;
        meta.mainProgram =
          if programs ++ hostPrograms == [ ] then name else builtins.head (programs ++ hostPrograms);
        installPhase = ''
          mkdir -p $out/bin
          ${lib.concatMapStrings (p: "ln -s /standins/${p} $out/bin/${p}\n") programs}
          ${lib.concatMapStrings (p: "ln -s /usr/bin/${p} $out/bin/${p}\n") hostPrograms}
          ${contents}
        '';
      }
      // extra
    );

  writeTextFile =
    {
      name,
      text,
      executable ? false,
      destination ? "",
      ...
    }:
    mkDerivation {
      inherit name text destination;
      executable = if executable then "1" else "";
      buildCommand = ''
        target=$out$destination
        mkdir -p "$(dirname "$target")"
        printf '%s' "$text" > "$target"
        if [ -n "$executable" ]; then chmod +x "$target"; fi
      '';
    };

  runCommandWith =
    name: env: command:
    mkDerivation (
      env
      // {
        inherit name;
        buildCommand = command;
      }
    );

  platform =
    let
      parsed = lib.systems.elaborate system;
    in
    parsed;

  stdenv = {
    inherit mkDerivation;
    shell = "/bin/bash";
    hostPlatform = platform;
    buildPlatform = platform;
    targetPlatform = platform;
    inherit (platform) isDarwin isLinux system;
  };

  # A Python package set with a buildPythonApplication that installs, like nixpkgs', one
  # program per entry of [project.scripts] in the source's pyproject.toml.
  python3Packages = lib.genAttrs [
    "setuptools"
    "twisted"
    "service-identity"
    "pyopenssl"
    "cryptography"
    "pytestCheckHook"
    "pytest-twisted"
    "hypothesis"
  ] (name: mkPackage name { }) // {
    python = python3;
    buildPythonApplication =
      args:
      let
        scripts = builtins.attrNames
          (builtins.fromTOML (builtins.readFile (source + "/pyproject.toml"))).project.scripts or { };
        # The tree the source was filtered from (lib.fileset.toSource), read in place.
        source = args.src.origSrc or args.src;
      in
      mkDerivation (
        args
        // {
          name = "${args.pname}-${args.version}";
          installPhase = ''
            mkdir -p $out/bin
            ${lib.concatMapStrings (p: "ln -s /standins/${p} $out/bin/${p}\n") scripts}
          '';
          passthru = (args.passthru or { }) // {
            inherit scripts;
          };
        }
      );
  };
  python3 = mkPackage "python3" { version = "3.12.0"; } // {
    sitePackages = "lib/python3.12/site-packages";
    interpreter = "/standins/python3";
    pkgs = python3Packages;
  };

  linuxBuilder = mkPackage "linux-builder" { programs = [ "create-builder" ]; } // {
    nixosConfig = {
      virtualisation.cores = 1;
      virtualisation.darwin-builder.hostPort = 31022;
      nixpkgs.hostPlatform.system = builtins.replaceStrings [ "darwin" ] [ "linux" ] system;
      networking.hostName = "linux-builder";
      # The VM's runner (nixpkgs' qemu-vm.nix), whose closure is Linux on a Mac.
      system.build.vm = mkPackage "nixos-vm" { programs = [ "run-linux-builder-vm" ]; };
    };
    override = _: linuxBuilder;
  };

  # Packages nix-darwin's default system refers to, with nothing in them.
  plain = lib.genAttrs [
    "jq"
    "git"
    "nix-info"
    "nix-zsh-completions"
    "nix-bash-completions"
    "zsh-autosuggestions"
    "zsh-syntax-highlighting"
    "zsh-fast-syntax-highlighting"
    "bash-completion"
    "less"
    "man"
    "darwin-rebuild"
    "tzdata"

    "nixos-render-docs"
    "documentation-highlighter"
    "texinfoInteractive"
  ] (name: mkPackage name { });

  self = plain // {
    inherit
      lib
      stdenv
      python3
      python3Packages
      writeTextFile
      ;
    stdenvNoCC = stdenv;
    hostPlatform = platform;
    buildPlatform = platform;
    __splicedPackages = self;
    appendOverlays = _: self;
    callPackage = lib.callPackageWith self;

    runCommand = runCommandWith;
    runCommandLocal = runCommandWith;
    runCommandNoCC = runCommandWith;
    writeText = name: text: writeTextFile { inherit name text; };
    writeScript =
      name: text:
      writeTextFile {
        inherit name text;
        executable = true;
      };
    writeScriptBin =
      name: text:
      writeTextFile {
        inherit name text;
        executable = true;
        destination = "/bin/${name}";
      };
    writeShellScript =
      name: text:
      writeTextFile {
        inherit name;
        executable = true;
        text = "#!/bin/bash\n" + text;
      };
    writeShellScriptBin =
      name: text:
      writeTextFile {
        inherit name;
        executable = true;
        destination = "/bin/${name}";
        text = "#!/bin/bash\n" + text;
      };
    buildEnv =
      {
        name,
        paths,
        pathsToLink ? [ "/" ],
        ...
      }:
      mkDerivation {
        inherit name paths pathsToLink;
        installPhase = ''
          for p in $pathsToLink; do mkdir -p "$out$p"; done
          for p in $paths; do
            if [ -d "$p/bin" ]; then mkdir -p $out/bin; ln -sf "$p"/bin/* $out/bin/ || true; fi
          done
        '';
      };
    symlinkJoin = self.buildEnv;
    replaceVarsWith =
      {
        name,
        src,
        replacements ? { },
        dir ? "",
        isExecutable ? false,
        meta ? { },
        ...
      }:
      mkDerivation {
        inherit name src meta;
        target = if dir == "" then "" else "/${dir}/${name}";
        executable = if isExecutable then "1" else "";
        buildCommand = ''
          target=$out$target
          mkdir -p "$(dirname "$target")"
          text=$(cat "$src")
          ${lib.concatStrings (
            lib.mapAttrsToList (n: v: ''
              value=${lib.escapeShellArg (toString v)}
              text=''${text//"@${n}@"/"$value"}
            '') replacements
          )}
          printf '%s\n' "$text" > "$target"
          if [ -n "$executable" ]; then chmod +x "$target"; fi
        '';
      };
    buildPackages = self;
    # The options' documentation, as nix-darwin's manual asks for it: only services.virby's
    # is rendered (which checks that its descriptions and defaults render at all).
    nixosOptionsDoc =
      {
        options,
        transformOptions ? (o: o),
        ...
      }:
      {
        optionsJSON = self.writeText "options.json" (
          builtins.toJSON (
            map transformOptions (lib.optionAttrSetToDocList (options.services.virby or { }))
          )
        );
      };
    closureInfo = { rootPaths }: runCommandWith "closure-info" { } "mkdir -p $out";
    formats.json = _: {
      generate = name: value: self.writeText name (builtins.toJSON value);
      type = lib.types.anything;
    };

    bash = mkPackage "bash" { programs = [ "bash" ]; } // {
      shellPath = "/bin/bash";
    };
    bashInteractive = self.bash;
    zsh = mkPackage "zsh" { programs = [ "zsh" ]; } // {
      shellPath = "/bin/zsh";
    };
    cacert = mkPackage "cacert" {
      contents = "mkdir -p $out/etc/ssl/certs; touch $out/etc/ssl/certs/ca-bundle.crt";
    } // {
      override = _: self.cacert;
    };
    # Runs the host's shellcheck, as nix-darwin's toplevel builder does on a Mac.
    shellcheck = mkDerivation {
      pname = "shellcheck";
      version = "0.10.0";
      installPhase = "mkdir -p $out/bin; ln -s /usr/bin/shellcheck $out/bin/shellcheck";
    };
    rsync = mkPackage "rsync" { programs = [ "rsync" ]; };
    coreutils = mkPackage "coreutils" {
      hostPrograms = [
        "dirname"
        "readlink"
      ];
    };
    gnugrep = mkPackage "gnugrep" { hostPrograms = [ "grep" ]; };
    gnused = mkPackage "gnused" { hostPrograms = [ "sed" ]; };
    openssh = mkPackage "openssh" { hostPrograms = [ "ssh-keygen" ]; };
    nix = mkPackage "nix" {
      version = "2.28.3";
      programs = [
        "nix"
        "nix-daemon"
        "nix-store"
        "nix-env"
      ];
    };
    vfkit = mkPackage "vfkit" {
      version = "0.6.3";
      programs = [ "vfkit" ];
    };
    # The flake's formatter.  nixpkgs keeps nixfmt-rfc-style only as an alias of nixfmt
    # that warns when used (pkgs/top-level/aliases.nix, since 2025-07-14): here a use fails.
    nixfmt = mkPackage "nixfmt" { programs = [ "nixfmt" ]; };
    nixfmt-rfc-style = throw "nixfmt-rfc-style is a deprecated alias: use nixfmt";
    darwin = {
      linux-builder = linuxBuilder;
    };
  };
in
self
