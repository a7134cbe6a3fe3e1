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
    mkEnableOption
    mkIf
    mkOption
    types
    ;
  cfg = config.services.virby;
  workingDirectory = "/var/lib/virby";
  uid = 348;
  gid = 348;
  hostSystem = pkgs.stdenv.hostPlatform.system;
  linuxSystem = builtins.replaceStrings [ "darwin" ] [ "linux" ] hostSystem;
  package = if virbyPackage != null then virbyPackage pkgs else pkgs.callPackage ./package.nix { };

  # The VM image, rebuilt whenever extraConfig or an image-affecting option changes; its
  # store path goes into the daemon's config, so launchd restarts the daemon with it.
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
  image = "${imageSystem.config.system.build.virbyImage}/nixos.img";

  daemonConfig = import ./lib/config.nix {
    inherit cfg image workingDirectory;
    vfkit = "${pkgs.vfkit}/bin/vfkit";
  };
  configFile = pkgs.writeText "virby.json" (builtins.toJSON daemonConfig);

  useDeterminate = cfg.supportDeterminateNix && options ? determinateNix;
  buildMachine = {
    hostName = "virby-vm";
    protocol = "ssh-ng";
    maxJobs = cfg.cores;
    inherit (cfg) speedFactor;
    supportedFeatures = [
      "benchmark"
      "big-parallel"
      "kvm"
      "nixos-test"
    ];
    systems = [ linuxSystem ] ++ lib.optional cfg.rosetta "x86_64-linux";
  };
in
{
  options.services.virby = {
    enable = mkEnableOption "Virby, an on-demand Linux builder VM for Nix";
    cores = mkOption {
      type = types.ints.positive;
      default = 8;
      description = "vCPUs of the VM; also the builder's maxJobs.";
    };
    memory = mkOption {
      type = types.either types.ints.positive types.str;
      default = 6144;
      example = "8GiB";
      description = "RAM of the VM: MiB as an integer, or a size such as \"6GiB\" (at least 1024 MiB).";
    };
    diskSize = mkOption {
      type = types.str;
      default = "100GiB";
      description = "Size of the VM's writable disk. It grows when raised and is never shrunk.";
    };
    port = mkOption {
      type = types.port;
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
      description = "Keep a copy of the client key readable by every local user, so anyone can `ssh virby-vm`.";
    };
    debug = mkOption {
      type = types.bool;
      default = false;
      description = "Keep the VM's serial console in ${workingDirectory}/serial.log and log verbosely.";
    };
    onDemand = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = "Boot the VM at the first build instead of keeping it running.";
      };
      ttl = mkOption {
        type = types.ints.positive;
        default = 180;
        description = "Minutes without a connection before an on-demand VM is powered off.";
      };
    };
    rosetta = mkOption {
      type = types.bool;
      default = false;
      description = "Share Rosetta with the VM, so it also builds x86_64-linux (aarch64-darwin only).";
    };
    extraConfig = mkOption {
      type = types.deferredModule;
      default = { };
      description = "A NixOS module merged last into the VM's configuration.";
    };
    sharedDirectories = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        src = "/Users/me/src";
      };
      description = "Host directories shared with the VM, by tag; mounted at /mnt/virtiofs/<tag>.";
    };
    supportDeterminateNix = mkOption {
      type = types.bool;
      default = false;
      description = "Register the builder in determinateNix.buildMachines instead of nix.buildMachines.";
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
      description = "Pass --nested to vfkit (Apple M3 or later, macOS 15 or later).";
    };
  };

  config = lib.mkMerge [
    (mkIf cfg.enable (
      lib.mkMerge [
        {
          services.virby.settings = daemonConfig;
          assertions = [
            {
              assertion = !cfg.rosetta || hostSystem == "aarch64-darwin";
              message = "services.virby.rosetta needs an aarch64-darwin host (Apple silicon).";
            }
            {
              # Forces the checks of lib/size.nix, whose errors name the option.
              assertion = builtins.isAttrs daemonConfig && daemonConfig.memory >= 1024;
              message = "services.virby.memory must be at least 1024 MiB.";
            }
          ];

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

          system.activationScripts.preActivation.text = ''
            # Refuse to adopt a _virby user or virby group that has other ids.
            for kind in Users:_virby:UniqueID:${toString uid} Groups:virby:PrimaryGroupID:${toString gid}; do
              IFS=: read -r dir name key want <<< "$kind"
              have=$(dscl . -read "/$dir/$name" "$key" 2>/dev/null | awk '{print $2}')
              if [ -n "$have" ] && [ "$have" != "$want" ]; then
                echo "virby: /$dir/$name exists with $key $have, not $want; remove it or free that id" >&2
                exit 1
              fi
            done
          '';
          # After the users exist and launchd has (re)loaded the daemon.  A new image means
          # new keys and a new disk: restart the daemon so no VM runs the old ones.
          system.activationScripts.postActivation.text = ''
            echo "preparing the Virby VM..." >&2
            virby_before=$(cat ${workingDirectory}/image-path 2>/dev/null || true)
            ${package}/bin/virby prepare --config ${configFile} --owner _virby:virby
            if [ "$virby_before" != "$(cat ${workingDirectory}/image-path)" ] \
              && launchctl print system/org.nixos.virbyd >/dev/null 2>&1; then
              launchctl kickstart -k system/org.nixos.virbyd
            fi
          '';

          launchd.daemons.virbyd = {
            serviceConfig = {
              Label = "org.nixos.virbyd";
              ProgramArguments = [
                "${package}/bin/twistd"
                "--nodaemon"
                "--pidfile="
                "virby"
                "--config"
                "${configFile}"
              ];
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
              StandardOutPath = "/var/log/virbyd.log";
              StandardErrorPath = "/var/log/virbyd.log";
              ThrottleInterval = 10;
            };
          };

          environment.etc."ssh/ssh_config.d/100-virby-vm.conf".text = import ./lib/ssh-config.nix {
            inherit (cfg) port;
            inherit workingDirectory;
          };
          environment.systemPackages = [ package ];
        }
        {
          # Names fixed up front (mkIf, not if-then-else): the module system must know which
          # options a definition sets before it may read config.
          nix.distributedBuilds = mkIf (!useDeterminate) true;
          nix.buildMachines = mkIf (!useDeterminate) [ buildMachine ];
        }
        (lib.optionalAttrs (options ? determinateNix) {
          determinateNix.buildMachines = mkIf useDeterminate [ buildMachine ];
        })
      ]
    ))
    (mkIf (!cfg.enable) {
      # Disabling removes what enabling made; these run only if it is there.
      system.activationScripts.postActivation.text = ''
        if [ -d ${workingDirectory} ]; then
          echo "removing the Virby VM's working directory..." >&2
          rm -rf ${workingDirectory}
        fi
        if dscl . -read /Users/_virby >/dev/null 2>&1; then dscl . -delete /Users/_virby; fi
        if dscl . -read /Groups/virby >/dev/null 2>&1; then dscl . -delete /Groups/virby; fi
      '';
    })
  ];
}
