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
  # The guest sshd's settings that the vfkit emulator's guest takes too (virby/emulator/
  # guest.py), so that what the tests see is what the VM does.  MaxStartups is the number of
  # unauthenticated connections sshd keeps before it refuses more; OpenSSH's default,
  # 10:30:100, starts refusing at random past 10.  All of the daemon's connections reach the
  # guest from one address at once when many builds start together, and on a Mac it serves
  # up to 480 of them (virby/daemon/capacity.py: the select reactor holds it to 1024 open files,
  # 64 kept, two for each connection), so the guest takes 512 before refusing any, and
  # drops none at random below that (a test keeps it above the daemon's cap).
  guestSshd = builtins.fromJSON (builtins.readFile ../virby/guest-sshd.json);
  # No host key is generated in the VM (hostKeys is empty), and nixpkgs' sshd-keygen unit
  # would then have an empty script, hence no ExecStart: systemd refuses such a unit, which
  # sshd wants, and the boot ends degraded.  Where the sshd module has generateHostKeys
  # (nixpkgs since late 2025), it is turned off and the unit is left out; before that, the
  # unit is masked.  A module of its own, since which option to set depends on `options`.
  noHostKeyGeneration =
    { options, ... }:
    {
      config =
        if options ? services.openssh.generateHostKeys then
          { services.openssh.generateHostKeys = false; }
        else
          { systemd.services.sshd-keygen.enable = false; };
    };
  # The port vfkit's --timesync connects to (TIMESYNC_VSOCK_PORT in virby/daemon/vfkit.py), and
  # VMADDR_CID_ANY: listen whatever CID the guest was given.
  timesyncVsockPort = 1234;
  vsockAnyCid = 4294967295;
in
{
  imports = [
    "${modulesPath}/profiles/minimal.nix"
    noHostKeyGeneration
  ];

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
    # systemd-networkd's DHCP client sends a DUID as client id by default, so bootpd would
    # record no MAC and the daemon (virby/leases.py) would never find the VM's address.
    assertions = [
      {
        assertion = !config.networking.useNetworkd;
        message = "services.virby.extraConfig: networking.useNetworkd is not supported: networkd's DHCP client id is a DUID, so bootpd records no MAC and the daemon cannot find the VM's address; keep dhcpcd.";
      }
    ];

    services.openssh = {
      enable = true;
      # The host key comes from the sshd-keys share, never generated here (see
      # noHostKeyGeneration).
      hostKeys = [ ];
      # PermitRootLogin is the image's alone: the emulated guest logs in whoever runs it.
      settings = guestSshd // {
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
      # The unit runs under `set -e`, and a command that fails in the EXIT trap would make
      # the whole unit fail (and sshd, which requires it, never start) after the keys were
      # installed: the clean-up only says what it could not do.  A failure before the trap
      # still fails the unit, with its own status.
      script = ''
        mkdir -p ${keysMount}
        mount -t virtiofs -o ro,nodev,noexec,nosuid sshd-keys ${keysMount}
        trap 'umount ${keysMount} || echo "cannot unmount ${keysMount}" >&2; rmdir ${keysMount} || echo "cannot remove ${keysMount}" >&2' EXIT
        install -d -m 755 /etc/ssh /etc/ssh/authorized_keys.d
        install -m 600 ${keysMount}/ssh_host_ed25519_key /etc/ssh/.ssh_host_ed25519_key.tmp
        mv -f /etc/ssh/.ssh_host_ed25519_key.tmp /etc/ssh/ssh_host_ed25519_key
        install -m 644 ${keysMount}/ssh_user_ed25519_key.pub /etc/ssh/authorized_keys.d/.builder.tmp
        mv -f /etc/ssh/authorized_keys.d/.builder.tmp /etc/ssh/authorized_keys.d/builder
      '';
    };

    # The guest's clock after the Mac sleeps: vfkit (--timesync vsockPort=1234, see
    # virby/daemon/vfkit.py) connects to this agent over vsock at every wake of the Mac and sends
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

    # No login on the serial console: hvc0 is vfkit's `virtio-serial,logFilePath` console,
    # which the framework only writes to a file (serial.log), so nothing could be typed on it.
    # Its output is where a VM that does not come up can be looked at.

    # Accounts are exactly what this configuration says; nothing inside the VM changes them.
    # No account has a password: the builder logs in with the key the host hands over at
    # boot, which NixOS cannot see at build time, so its lock-out assertion must be told.
    users.mutableUsers = false;
    users.allowNoPasswordLogin = true;
    users.users.builder = {
      isNormalUser = true;
      description = "Nix remote builds";
    };

    # No copy of nixpkgs' source in the image: no channel, and neither the flake registry
    # entry nor the NIX_PATH that lib.nixosSystem would pin to it (nixpkgs.flake.source; both
    # put the source into the system's closure).  A builder gets derivations evaluated on
    # the Mac and never looks up `<nixpkgs>` or `nixpkgs#...`; the source would only make
    # the image larger and change it with every nixpkgs update.  extraConfig may turn them
    # back on.
    nix.channel.enable = false;
    nixpkgs.flake.setFlakeRegistry = lib.mkDefault false;
    nixpkgs.flake.setNixPath = lib.mkDefault false;
    # No nixos-rebuild, nixos-install or the other installer tools: nothing reconfigures
    # the VM from inside, a new image replaces it.  (make-disk-image takes nixos-install
    # from system.build, which nixpkgs defines whatever this says.)
    system.disableInstallerTools = true;

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
