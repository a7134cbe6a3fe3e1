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
        };
        "/boot" = {
          device = "/dev/disk/by-label/ESP";
          fsType = "vfat";
        };
      }
      # Shared directories, each at /mnt/virtiofs/<tag>.
      (lib.mapAttrs' (
        tag: _:
        lib.nameValuePair "/mnt/virtiofs/${tag}" {
          device = tag;
          fsType = "virtiofs";
          options = [ "nofail" ];
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
      authorizedKeysFiles = [ "/etc/ssh/authorized_keys.d/%u" ];
    };

    # Take the keys `virby prepare` made from the share once, before sshd's first start;
    # the share is then unmounted, so nothing in the VM can read the host's copy.
    systemd.services.virby-install-keys = {
      description = "Install the SSH keys handed to the VM by Virby";
      wantedBy = [ "multi-user.target" ];
      before = [ "sshd.service" ];
      requiredBy = [ "sshd.service" ];
      unitConfig.ConditionPathExists = "!/etc/ssh/ssh_host_ed25519_key";
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      path = [ pkgs.util-linux ];
      script = ''
        mkdir -p ${keysMount} /etc/ssh/authorized_keys.d
        mount -t virtiofs -o ro sshd-keys ${keysMount}
        install -m 600 ${keysMount}/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
        install -m 644 ${keysMount}/ssh_user_ed25519_key.pub /etc/ssh/authorized_keys.d/builder
        umount ${keysMount}
        rmdir ${keysMount}
      '';
    };

    users.users.builder = {
      isNormalUser = true;
      description = "Nix remote builds";
    };

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
    };
  };
}
