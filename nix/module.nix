# The nix-darwin module: services.virby.
#
# Used through the flake (darwinModules.default), which passes its own nixpkgs (to build the
# Linux VM image) and the Virby package.
{
  nixpkgs,
  virbyPackage ? null,
}:
{
  config,
  lib,
  pkgs,
  options,
  ...
}:
let
  inherit (lib)
    mkDefault
    mkEnableOption
    mkIf
    mkOption
    types
    ;
  cfg = config.services.virby;
  workingDirectory = "/var/lib/virby";
  # The ids of the _virby user and the virby group.  Below 501, so they are system accounts
  # that the login window hides; nix-darwin's own nixbld users start at 351.
  uid = 348;
  gid = 348;
  label = "org.nixos.virbyd";
  logFile = "/var/log/virbyd.log";
  hostSystem = pkgs.stdenv.hostPlatform.system;
  linuxSystem = builtins.replaceStrings [ "darwin" ] [ "linux" ] hostSystem;
  defaultPackage =
    if virbyPackage != null then virbyPackage pkgs else pkgs.callPackage ./package.nix { };
  package = cfg.package;
  # What goes on the Mac's PATH: the `virby` command alone.  The package's other programs
  # are the daemon, which launchd runs through /etc/virby/virbyd, and vfkit-emulator, the
  # tests' stand-in for vfkit, which is Linux-only (it calls prctl(2)) and of no use on a Mac.
  # lib.getExe names the package's meta.mainProgram, `virby`.
  command = pkgs.runCommand "virby-command" { meta.mainProgram = "virby"; } ''
    mkdir -p $out/bin
    ln -s ${lib.getExe package} $out/bin/virby
  '';

  # The VM image, rebuilt whenever extraConfig or an image-affecting option changes; its
  # store path goes into the daemon's config, which launchd's plist does not name (see
  # `stableCommand`).
  imageSystem = nixpkgs.lib.nixosSystem {
    system = linuxSystem;
    modules = [
      ./image.nix
      {
        virby.image = {
          inherit (cfg) rosetta sharedDirectories;
        };
      }
      cfg.extraConfig
    ];
  };
  imageBuild = imageSystem.config.system.build.virbyImage;
  # The switch builds no Linux derivation.  The daemon's config names the image's output
  # path without its string context, so the system does not depend on that output (which
  # may not exist yet); the activation script names the image's derivation with its output
  # dependency discarded, so the .drv file and the derivations it needs are in the system's
  # closure (as plain store paths) and `virby prepare` can realise it after activation,
  # through whatever builder Nix has for the image's system.
  image = builtins.unsafeDiscardStringContext "${imageBuild}/nixos.img";
  imageDerivation = builtins.unsafeDiscardOutputDependency imageBuild.drvPath;

  # Stage 0: nixpkgs' own linux-builder, unmodified so that cache.nixos.org has it, which
  # prepare starts as a temporary builder when Nix has none for the image's system
  # (docs/one-switch.md).  Its runner's closure is Linux, so, like the image, the system
  # holds its derivation and not its output.
  stage0Config = pkgs.darwin.linux-builder.nixosConfig;
  stage0Flags = lib.escapeShellArgs [
    "--stage0-runner"
    (builtins.unsafeDiscardOutputDependency stage0Config.system.build.vm.drvPath)
    "--stage0-system"
    stage0Config.nixpkgs.hostPlatform.system
    "--stage0-host-key"
    stage0HostKey
    "--stage0-port"
    (toString stage0Config.virtualisation.darwin-builder.hostPort)
  ];
  # The public half of nixpkgs' nixos/modules/profiles/keys/ssh_host_ed25519_key, the
  # linux-builder's published host key, in base64 as a machines line wants it (the value
  # of nixpkgs' doc/packages/darwin-builder.section.md and nix-darwin's linux-builder).
  stage0HostKey = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUpCV2N4Yi9CbGFxdDFhdU90RStGOFFVV3JVb3RpQzVxQkorVXVFV2RWQ2Igcm9vdEBuaXhvcwo=";

  # The daemon's bounds of each value (its config loader is the source; lib/bounds.nix says
  # how they are kept in step).
  bounds = import ./lib/bounds.nix;
  between = range: types.ints.between range.min range.max;

  daemonConfig = import ./lib/config.nix {
    inherit cfg image workingDirectory;
    vfkit = "${pkgs.vfkit}/bin/vfkit";
  };
  configFile = pkgs.writeText "virby.json" (builtins.toJSON daemonConfig);

  # The daemon's program and config, at paths that are the same for every system, so that
  # the launchd plist is too (docs/one-switch.md, "The image is built after activation"):
  #
  # - nix-darwin's modules/system/launchd.nix `diff`s each plist of the new system against
  #   the one in /Library/LaunchDaemons and does nothing at all when they are the same;
  #   when they differ it runs `launchctl unload` (launchd stops the running job: SIGTERM,
  #   which cuts every build going through the daemon), copies the new plist, and
  #   `launchctl load -w`.  With store paths in the command, every new package, option or
  #   image would do that; with these paths only a change of the plist's own settings
  #   (port, onDemand.enable) does.  A new image, config or package reaches the daemon
  #   instead when `virby prepare` asks it to renew: it serves on the old VM until no
  #   connection uses it, then exits, and launchd starts this same command again.
  # - modules/system/etc.nix makes each environment.etc entry a symlink (`ln -s source
  #   target` in the system's etc tree; the activation's etc step points /etc/static at
  #   that tree and makes /etc/<target> a link to /etc/static/<target>): /etc/virby/virbyd
  #   -> /etc/static/virby/virbyd -> <etc tree>/virby/virbyd -> ${package}/bin/virbyd.
  #   Nothing is copied (modules/lib/write-text.nix gives an entry no mode), and exec
  #   follows links, so the program is the package's own, executable as it is in the store.
  # - modules/system/activation-scripts.nix runs the etc step before the launchd step and
  #   before postActivation, so both links name this system's package and config when
  #   prepare runs, when launchd loads a new plist, and whenever the daemon starts again.
  # - modules/launchd/default.nix turns `command` into ProgramArguments [ "/bin/sh" "-c"
  #   "/bin/wait4path /nix/store && exec <command>" ]: the links end in the store, so at
  #   boot the wait for the store's volume is still what makes them resolve.
  etcProgram = "virby/virbyd";
  etcConfig = "virby/config.json";
  stableCommand = "/etc/${etcProgram} --config /etc/${etcConfig}";

  # Where the builder is registered: Determinate's module owns /etc/nix/machines when it is
  # imported and enabled (it forces nix.enable off); nix-darwin's nix module otherwise.
  haveDeterminate = options ? determinateNix;
  useDeterminate = cfg.supportDeterminateNix && haveDeterminate && config.determinateNix.enable;
  useNix = !useDeterminate && config.nix.enable;
  buildMachine = {
    hostName = "virby-vm";
    protocol = "ssh-ng";
    maxJobs = cfg.cores;
    inherit (cfg) speedFactor;
    # kvm and nixos-test need /dev/kvm in the VM, which only nested virtualization gives:
    # without it such a build would run its QEMU under slow emulation (TCG) or fail.
    supportedFeatures = [
      "benchmark"
      "big-parallel"
    ]
    ++ lib.optionals cfg.nestedVirtualization [
      "kvm"
      "nixos-test"
    ];
    systems = [ linuxSystem ] ++ lib.optional cfg.rosetta "x86_64-linux";
  };

  # Reads one attribute of a directory record, or nothing when the record is missing.
  # `dscl . -read` of a missing record exits 56: under activation's `set -e` and
  # `pipefail` that must be caught here, or the first switch on a new Mac stops before
  # nix-darwin has made the user.
  readRecord = var: record: key: ''
    ${var}=$(dscl . -read ${record} ${key} 2>/dev/null) || ${var}=
    ${var}=''${${var}#${key}: }
  '';
  # Delete a user or group record only when it carries Virby's id.
  deleteIfOurs = what: record: key: idName: id: ''
    ${readRecord "virby_have" record key}
    if [ "$virby_have" = ${toString id} ]; then
      echo "deleting ${what}..." >&2
      dscl . -delete ${record}
    elif [ -n "$virby_have" ]; then
      echo "leaving ${what} alone: its ${idName} is $virby_have, not Virby's ${toString id}" >&2
    fi
  '';
in
{
  options.services.virby = {
    enable = mkEnableOption "Virby, an on-demand Linux builder VM for Nix" // {
      description = ''
        Whether to run Virby, an on-demand Linux builder VM for Nix.  It also sets Nix's
        `builders-use-substitutes` to true (as a default, so a value of your own wins), and
        that setting is Nix's, not Virby's: it applies to every remote builder of this Mac,
        each of which then fetches a build's inputs from the binary caches itself instead of
        receiving them from the Mac.
      '';
    };
    package = mkOption {
      type = types.package;
      default = defaultPackage;
      defaultText = lib.literalMD "the Virby package of the flake, built with this system's nixpkgs";
      description = "The Virby package: `virby` (prepare, status, start, stop, doctor) and the daemon `virbyd`.";
    };
    cores = mkOption {
      type = between bounds.cores;
      default = 8;
      description = "vCPUs of the VM; also the builder's maxJobs.";
    };
    memory = mkOption {
      type = types.either (between bounds.memory) types.str;
      default = 6144;
      example = "8GiB";
      description = "RAM of the VM: MiB as an integer, or a size such as \"6GiB\" (1 GiB to 1 TiB).";
    };
    diskSize = mkOption {
      type = types.str;
      default = "100GiB";
      description = "Size of the VM's writable disk (1 GiB to 64 TiB). It grows when raised and is never shrunk.";
    };
    port = mkOption {
      type = between bounds.port;
      default = 31222;
      description = "Loopback port of the builder (the launchd socket the daemon adopts).";
    };
    speedFactor = mkOption {
      type = types.ints.positive;
      default = 1;
      description = "speedFactor of the builder in nix.buildMachines.";
    };
    allowUserSsh = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Let every local user `ssh virby-vm`: `virby prepare` keeps a copy of the client key
        readable by all (`${workingDirectory}/ssh_user_ed25519_key.shared`), and the ssh
        configuration names that copy.
      '';
    };
    debug = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Log verbosely, and keep the VM's serial console in ${workingDirectory}/serial.log after
        the VM stops.  The console is output only (vfkit writes it to that file), so it offers
        no login.
      '';
    };
    onDemand = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = "Boot the VM at the first build instead of keeping it running.";
      };
      ttl = mkOption {
        # The daemon counts seconds, up to 365 days.
        type = types.ints.between 1 (bounds.ttl.max / 60);
        default = 180;
        description = "Minutes without a connection before an on-demand VM is powered off (at most 365 days).";
      };
    };
    rosetta = mkOption {
      type = types.bool;
      default = false;
      description = "Share Rosetta with the VM, so it also builds x86_64-linux.";
    };
    extraConfig = mkOption {
      type = types.deferredModule;
      default = { };
      description = "A NixOS module merged last into the VM's configuration.";
    };
    sharedDirectories = mkOption {
      type = types.attrsOf types.str;
      default = { };
      # Outside /Users: a home folder lets no other user through (see below).
      example = {
        src = "/opt/src";
      };
      description = ''
        Host directories shared with the VM, by tag; mounted at /mnt/virtiofs/<tag>. A tag is
        letters, digits, `.`, `_` or `-`, at most ${toString bounds.shareTagBytes} bytes; a
        directory is an absolute path without `,`; at most ${toString bounds.shares} of them.

        vfkit runs as the daemon's user `_virby`, and stops every boot at a share that user
        cannot reach: `_virby` must be able to search every folder above the directory and to
        list the directory itself, and the VM reads there what `_virby` may read. A home
        folder (`/Users/<name>`, `drwxr-x---`) lets no other user through, and macOS's
        privacy protection keeps daemons out of Desktop, Documents, Downloads and iCloud Drive
        (`~/Library/Mobile Documents`) whatever the permissions say. Share a folder outside
        `/Users`, or let `_virby` through the folders above it with an ACL
        (`sudo chmod +a "_virby allow search" /Users/<name>`). `virby prepare`, which the
        switch runs, refuses a share `_virby` cannot reach, naming the folder in the way and
        the fix; `sudo virby doctor` checks the same.
      '';
    };
    supportDeterminateNix = mkOption {
      type = types.bool;
      default = haveDeterminate;
      defaultText = lib.literalMD "whether Determinate's nix-darwin module is imported";
      description = ''
        Register the builder in `determinateNix.buildMachines` (Determinate's nix-darwin
        module, which turns `nix.enable` off) instead of `nix.buildMachines`.
      '';
    };
    settings = mkOption {
      type = types.attrsOf types.anything;
      readOnly = true;
      internal = true;
      description = "The daemon's configuration as written to its JSON file (for inspection).";
    };
    nestedVirtualization = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Pass --nested to vfkit (Apple M3 or later, macOS 15 or later), so that the VM has
        /dev/kvm, and advertise the builder's `kvm` and `nixos-test` features, which only
        then hold: without nesting a build that needs them (a NixOS test, a disk image such as
        Virby's own) would run its QEMU under emulation, many times slower, or fail, so Nix
        must send it to another builder.  On a Mac that cannot nest, the daemon drops
        --nested and says so in its log, and such builds then run emulated after all.
      '';
    };
    stage0 = mkOption {
      type = types.bool;
      default = true;
      description = ''
        When the switch finds no image and Nix has no builder for the image's system, start
        nixpkgs' `darwin.linux-builder` (from cache.nixos.org) as a temporary builder with
        keys of its own, build the image through it, then stop it and remove its files.  It
        listens on its own port (31022 unless changed in nixpkgs); off, the switch prints
        the ways to get a builder instead.
      '';
    };
    ephemeral = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Boot the VM every time from a fresh copy of the image (an APFS clone, which costs no
        time), grown to `diskSize`: nothing a build left in the VM survives a stop, and the
        store starts empty at every boot (builds fetch their inputs again).
      '';
    };
  };

  config = lib.mkMerge [
    (mkIf cfg.enable (
      lib.mkMerge [
        {
          services.virby.settings = daemonConfig;
          # The VM image alone, e.g. to build it on a Linux machine and copy it to the Mac.
          system.build.virbyImage = imageBuild;

          assertions = [
            {
              # The one host Virby supports (nixpkgs 26.11 dropped x86_64-darwin), said first
              # and alone: Rosetta, the VM's system and the package all follow from it.
              assertion = hostSystem == "aarch64-darwin";
              message = "services.virby supports only aarch64-darwin hosts (Apple silicon); this one is ${hostSystem}.";
            }
            {
              # Forces the checks of lib/ (memory, disk size, shared directories), so that a
              # value the daemon would refuse fails the evaluation, with an error naming the
              # option; the option types check the rest.
              assertion = builtins.deepSeq [
                daemonConfig.memory
                daemonConfig.disk-size
                daemonConfig.shared-dirs
              ] true;
              message = "services.virby: the daemon's config could not be checked.";
            }
            {
              assertion = cfg.supportDeterminateNix -> haveDeterminate;
              message = ''
                services.virby.supportDeterminateNix is on, but Determinate's nix-darwin module is
                not imported, so nothing would register the builder: add
                determinate.darwinModules.default to your modules.'';
            }
          ];
          warnings =
            lib.optional
              (!useDeterminate && !config.nix.enable && !(cfg.supportDeterminateNix && !haveDeterminate))
              (
            if haveDeterminate then
              "services.virby: determinateNix.enable is off and so is nix.enable: nothing registers the builder virby-vm, and Nix will not use it. Turn one of them on."
            else
              "services.virby: nix.enable is off and Determinate's nix-darwin module is not imported: nothing registers the builder virby-vm in /etc/nix/machines, and Nix will not use it. With Determinate Nix, add determinate.darwinModules.default to your modules; otherwise set nix.enable = true."
          );

          users.users._virby = {
            inherit uid gid;
            home = workingDirectory;
            createHome = false;
            shell = "/usr/bin/false";
            isHidden = true;
            description = "Virby builder VM";
          };
          users.groups.virby = {
            inherit gid;
            members = [ "_virby" ];
            description = "Virby builder VM";
          };
          users.knownUsers = [ "_virby" ];
          users.knownGroups = [ "virby" ];

          # Before nix-darwin's users step: a _virby or virby that exists with other ids would
          # be skipped there with a warning, and `virby prepare` would then hand the VM's keys
          # to an account that is not ours.  Refuse, saying which record is in the way.
          system.activationScripts.preActivation.text = ''
            ${readRecord "virby_have" "/Users/_virby" "UniqueID"}
            if [ -n "$virby_have" ] && [ "$virby_have" != ${toString uid} ]; then
              printf >&2 'error: the user _virby exists with uid %s; Virby needs uid ${toString uid}. Remove it (sudo dscl . -delete /Users/_virby) and switch again.\n' "$virby_have"
              exit 1
            fi
            ${readRecord "virby_have" "/Groups/virby" "PrimaryGroupID"}
            if [ -n "$virby_have" ] && [ "$virby_have" != ${toString gid} ]; then
              printf >&2 'error: the group virby exists with gid %s; Virby needs gid ${toString gid}. Remove it (sudo dscl . -delete /Groups/virby) and switch again.\n' "$virby_have"
              exit 1
            fi
            virby_have=$(dscl . -list /Users UniqueID | awk '$2 == ${toString uid} && $1 != "_virby" { print $1 }') || virby_have=
            if [ -n "$virby_have" ]; then
              printf >&2 'error: uid ${toString uid}, which Virby needs for its user _virby, belongs to %s. Free that uid and switch again.\n' "$virby_have"
              exit 1
            fi
            virby_have=$(dscl . -list /Groups PrimaryGroupID | awk '$2 == ${toString gid} && $1 != "virby" { print $1 }') || virby_have=
            if [ -n "$virby_have" ]; then
              printf >&2 'error: gid ${toString gid}, which Virby needs for its group virby, belongs to %s. Free that gid and switch again.\n' "$virby_have"
              exit 1
            fi
          '';

          # Right before nix-darwin (re)loads the launchd daemons: the users exist by now, and
          # the daemon must find its log file and its working directory when launchd starts it.
          system.activationScripts.launchd.text = lib.mkBefore ''
            echo "preparing the Virby VM..." >&2
            # launchd opens StandardOutPath as the job's user, who cannot create files in
            # /var/log: the file must exist and be _virby's before the job starts.
            touch ${logFile}
            chown _virby:virby ${logFile}
            chmod 0644 ${logFile}
            # No realisation here: the image is built after the launchd step, once the
            # machines file and the daemon are those of this system (see postActivation).
            # prepare ends by asking a running daemon to renew onto what it made (see
            # `stableCommand`); none running, it says nothing.
            ${package}/bin/virby prepare --config ${configFile} --owner _virby:virby \
              --image-derivation ${imageDerivation} --no-realise
          '';

          # After nix-darwin's launchd and nix-daemon steps: realise the image (a GC root in
          # the working directory), through whatever builder Nix has for its system, with
          # its progress on the switch's terminal.  A failure does not fail the switch:
          # prepare says why and what to do, and the daemon refuses boots until an image
          # exists.  prepare asks the daemon to renew onto a new image, as above.
          system.activationScripts.postActivation.text = ''
            ${package}/bin/virby prepare --config ${configFile} --owner _virby:virby \
              --image-derivation ${imageDerivation}${lib.optionalString cfg.stage0 " ${stage0Flags}"}
          '';

          launchd.daemons.virbyd = {
            # The same for every package, config and image (see `stableCommand`); nix-darwin
            # wraps it in `/bin/wait4path /nix/store`, so that at boot the daemon waits for
            # the Nix store volume, where the links end, to be mounted.
            command = stableCommand;
            serviceConfig = {
              Label = label;
              Sockets.Listener = {
                SockFamily = "IPv4";
                SockNodeName = "127.0.0.1";
                SockServiceName = toString cfg.port;
              };
              KeepAlive = !cfg.onDemand.enable;
              RunAtLoad = !cfg.onDemand.enable;
              UserName = "_virby";
              GroupName = "virby";
              WorkingDirectory = workingDirectory;
              StandardOutPath = logFile;
              StandardErrorPath = logFile;
              ThrottleInterval = 10;
              # launchd starts a job with a soft limit of 256 open files, and each spliced
              # connection holds two.  launchd applies this with setrlimit(2) in the job's
              # process; the hard limit (unlimited by default) is left alone.  The daemon does
              # not use all of it on macOS: under Twisted's default reactor there, select(2),
              # which cannot watch a descriptor of 1024 or above, it holds its soft limit at
              # 1024, keeps 64 for itself and serves up to 480 connections at once
              # (virby/daemon/capacity.py, which would raise the limit itself as far as that anyway).
              SoftResourceLimits.NumberOfFiles = 4096;
            };
          };

          environment.etc."ssh/ssh_config.d/100-virby-vm.conf".text = import ./lib/ssh-config.nix {
            inherit (cfg) port allowUserSsh;
            inherit workingDirectory;
          };
          # The port of stage 0's machines line, which cannot name one; root's ssh (the
          # nix-daemon's) reads this, as nixpkgs' instructions for the linux-builder have it.
          environment.etc."ssh/ssh_config.d/100-virby-stage0.conf" = mkIf cfg.stage0 {
            text = ''
              Host virby-stage0
                HostName 127.0.0.1
                Port ${toString stage0Config.virtualisation.darwin-builder.hostPort}
                HostKeyAlias virby-stage0
            '';
          };
          environment.systemPackages = [ command ];
          # The daemon's program and config as launchd runs them (see `stableCommand`);
          # the config is also where `virby status`, `doctor`, `start` and `stop` find it
          # without --config (its store path changes with every option).
          environment.etc.${etcProgram}.source = lib.getExe' package "virbyd";
          environment.etc.${etcConfig}.source = configFile;
          # The daemon's log, rotated by macOS's newsyslog (run by launchd every hour): past
          # 10 MiB it is renamed, 5 old ones are kept uncompressed, and a new file is made
          # for _virby.  The daemon notices within a minute and opens the new file (launchd
          # opened the old one for it; virby/daemon/logfile.py).  N: no signal, so no pid file that
          # a crashed daemon could leave naming another process.  B: no "logfile turned over"
          # line in the daemon's log.
          environment.etc."newsyslog.d/${label}.conf".text = ''
            # logfile  owner:group  mode  count  size(KiB)  when  flags
            ${logFile}  _virby:virby  644  5  10240  *  BN
          '';
        }
        {
          # Names fixed up front (mkIf, not if-then-else): the module system must know which
          # options a definition sets before it may read config.
          nix.distributedBuilds = mkIf useNix true;
          nix.buildMachines = mkIf useNix [ buildMachine ];
          # The VM fetches its inputs from the binary caches itself instead of having the Mac
          # download them and copy them over ssh (as nix-darwin's linux-builder does).  The
          # setting is global: every other remote builder gets it too (the enable option says
          # so).
          nix.settings.builders-use-substitutes = mkIf useNix (mkDefault true);
        }
        (lib.optionalAttrs haveDeterminate {
          determinateNix = mkIf useDeterminate {
            buildMachines = [ buildMachine ];
            distributedBuilds = true;
            customSettings.builders-use-substitutes = mkDefault true;
          };
        })
      ]
    ))
    (mkIf (!cfg.enable) {
      # Disabling removes what enabling made, after nix-darwin's launchd step has stopped
      # the daemon.  The user and the group go only when they carry Virby's ids: anything
      # else called _virby or virby is not ours to delete.
      system.activationScripts.postActivation.text = ''
        if [ -d ${workingDirectory} ]; then
          echo "removing the Virby VM's working directory..." >&2
          rm -rf ${workingDirectory}
        fi
        ${deleteIfOurs "user _virby" "/Users/_virby" "UniqueID" "uid" uid}
        ${deleteIfOurs "group virby" "/Groups/virby" "PrimaryGroupID" "gid" gid}
      '';
    })
  ];
}
