# The NixOS configuration of the builder VM, and its raw EFI disk image
# (config.system.build.virbyImage, holding nixos.img).
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  cfg = config.virby.image;
  keysMount = "/run/virby-sshd-keys";
  # The port vfkit's --timesync connects to (TIMESYNC_VSOCK_PORT in virby/vfkit.py), and
  # VMADDR_CID_ANY: listen whatever CID the guest was given.
  timesyncVsockPort = 1234;
  vsockAnyCid = 4294967295;
in
{
  imports = [ "${modulesPath}/profiles/minimal.nix" ];

  options.virby.image = {
    rosetta = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Mount the Rosetta share and register it for x86_64-linux binaries.";
    };
    sharedDirectories = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { };
      description = "Host directories shared by tag; mounted at /mnt/virtiofs/<tag>.";
    };
    debug = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Log root in on the serial console (hvc0) without a password, to look inside a VM that does not come up.";
    };
    diskSize = lib.mkOption {
      type = lib.types.either (lib.types.enum [ "auto" ]) lib.types.int;
      default = "auto";
      description = "Size of the image as built; `virby prepare` grows the copy it boots.";
    };
  };

  config = {
    system.stateVersion = lib.mkDefault "25.05";
    networking.hostName = "virby-vm";

    boot.loader.systemd-boot.enable = true;
    boot.loader.efi.canTouchEfiVariables = false;
    boot.loader.timeout = 0;
    boot.kernelParams = [ "console=hvc0" ];
    boot.initrd.availableKernelModules = [
      "virtio_pci"
      "virtio_blk"
      "virtio_net"
      "virtiofs"
    ];
    boot.growPartition = true;
    fileSystems = lib.mkMerge [
      {
        "/" = {
          device = "/dev/disk/by-label/nixos";
          fsType = "ext4";
          autoResize = true;
          # diff.img is a sparse file on the Mac: blocks the guest frees (a garbage
          # collection, a finished build) go back to the host only when ext4 discards them
          # and the virtio-blk device passes the discard on.
          options = [
            "discard"
            "noatime"
          ];
        };
        "/boot" = {
          device = "/dev/disk/by-label/ESP";
          fsType = "vfat";
          # The ESP holds systemd-boot's random seed: root's only.
          options = [ "umask=0077" ];
        };
      }
      # Shared directories, each at /mnt/virtiofs/<tag>.
      (lib.mapAttrs' (
        tag: _:
        lib.nameValuePair "/mnt/virtiofs/${tag}" {
          device = tag;
          fsType = "virtiofs";
          options = [
            "nofail"
            "nodev"
            "nosuid"
          ];
        }
      ) cfg.sharedDirectories)
    ];

    # bootpd keys leases by what the client sends as its id: send the MAC, so the daemon
    # finds the VM's address in /var/db/dhcpd_leases.
    networking.useDHCP = true;
    networking.dhcpcd.extraConfig = ''clientid ""'';

    services.openssh = {
      enable = true;
      hostKeys = [ ]; # the host key comes from the sshd-keys share, never generated here
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = "no";
      };
      extraConfig = "HostKey /etc/ssh/ssh_host_ed25519_key";
      # Only the key the host handed over: none from a home directory, where a build that
      # runs as the builder user could add its own.
      authorizedKeysFiles = lib.mkForce [ "/etc/ssh/authorized_keys.d/%u" ];
    };

    # The keys `virby prepare` made, from the sshd-keys share, before sshd starts, at every
    # boot.  Not once (a condition on a key the guest already has): the keys belong to the
    # host, which makes new ones whenever it prepares a new image or finds one missing, and
    # the guest's disk can outlive them; no file inside the guest can tell that the host's
    # copy changed.  Copying two small files costs nothing at boot, and a boot interrupted
    # between the two copies is simply redone by the next one.  Each file is written under
    # a temporary name beside its target and renamed over it, so sshd never reads half a key.
    # The share is mounted read-only, without devices, executables or set-uid files, and is
    # unmounted again, so nothing in the VM can read the host's copy afterwards.
    systemd.services.virby-install-keys = {
      description = "Install the SSH keys handed to the VM by Virby";
      wantedBy = [ "multi-user.target" ];
      before = [ "sshd.service" ];
      requiredBy = [ "sshd.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      path = [ pkgs.util-linux ];
      script = ''
        mkdir -p ${keysMount}
        mount -t virtiofs -o ro,nodev,noexec,nosuid sshd-keys ${keysMount}
        trap 'umount ${keysMount}; rmdir ${keysMount}' EXIT
        install -d -m 755 /etc/ssh /etc/ssh/authorized_keys.d
        install -m 600 ${keysMount}/ssh_host_ed25519_key /etc/ssh/.ssh_host_ed25519_key.tmp
        mv -f /etc/ssh/.ssh_host_ed25519_key.tmp /etc/ssh/ssh_host_ed25519_key
        install -m 644 ${keysMount}/ssh_user_ed25519_key.pub /etc/ssh/authorized_keys.d/.builder.tmp
        mv -f /etc/ssh/authorized_keys.d/.builder.tmp /etc/ssh/authorized_keys.d/builder
      '';
    };

    # The guest's clock after the Mac sleeps: vfkit (--timesync vsockPort=1234, see
    # virby/vfkit.py) connects to this agent over vsock at every wake of the Mac and sends
    # guest-set-time with the Mac's time.  nixpkgs' module starts the agent only when a
    # virtio-serial port named org.qemu.guest_agent.0 appears, which vfkit never makes, so
    # the unit is wanted at boot and told to listen on vsock instead: on every CID (the
    # framework gives the guest its own), port 1234.  The agent answers only what vfkit asks
    # (guest-set-time) and the handshake commands; nothing else of the host's agent protocol
    # (files, commands, users) is open to the host.  nixpkgs' qemu-ga runs hwclock from
    # /run/current-system/sw/bin, where util-linux is.
    services.qemuGuest.enable = true;
    boot.kernelModules = [ "vmw_vsock_virtio_transport" ];
    systemd.services.qemu-guest-agent = {
      wantedBy = [ "multi-user.target" ];
      serviceConfig.ExecStart = lib.mkForce (
        lib.concatStringsSep " " [
          "${config.services.qemuGuest.package}/bin/qemu-ga"
          "--statedir /run/qemu-ga"
          "--method=vsock-listen"
          "--path=${toString vsockAnyCid}:${toString timesyncVsockPort}"
          "--allow-rpcs=guest-sync-delimited,guest-sync,guest-ping,guest-info,guest-set-time"
        ]
      );
    };

    # The serial console is where a VM that does not come up can be looked at.
    services.getty.autologinUser = lib.mkIf cfg.debug "root";

    # Accounts are exactly what this configuration says; nothing inside the VM changes them.
    # No account has a password: the builder logs in with the key the host hands over at
    # boot, which NixOS cannot see at build time, so its lock-out assertion must be told.
    users.mutableUsers = false;
    users.allowNoPasswordLogin = true;
    users.users.builder = {
      isNormalUser = true;
      description = "Nix remote builds";
    };

    # No channel: the image would carry a copy of nixpkgs' source as one.  `<nixpkgs>` and
    # `nixpkgs#...` resolve through the flake registry instead, pinned to the nixpkgs the
    # image was built from (lib.nixosSystem sets nixpkgs.flake.source; say so explicitly).
    nix.channel.enable = false;
    nixpkgs.flake.setFlakeRegistry = true;
    nixpkgs.flake.setNixPath = true;

    nix.settings = {
      trusted-users = [ "builder" ];
      experimental-features = [
        "nix-command"
        "flakes"
      ];
      min-free = 5 * 1024 * 1024 * 1024;
      max-free = 7 * 1024 * 1024 * 1024;
      auto-optimise-store = true;
    };

    virtualisation.rosetta = lib.mkIf cfg.rosetta {
      enable = true;
      mountTag = "rosetta";
    };

    documentation.enable = false;
    documentation.nixos.enable = false;
    documentation.man.enable = false;
    programs.command-not-found.enable = false;
    services.udisks2.enable = false;
    xdg.icons.enable = false;
    xdg.mime.enable = false;

    system.build.virbyImage = import "${modulesPath}/../lib/make-disk-image.nix" {
      inherit lib config pkgs;
      format = "raw";
      partitionTableType = "efi";
      diskSize = cfg.diskSize;
      name = "virby-vm-image";
      copyChannel = false;
    };
  };
}
