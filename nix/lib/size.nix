# Sizes as the daemon reads them (virby.config.parse_size): a whole number with an optional
# binary unit K, M, G or T, optionally followed by "iB".  Decimal spellings such as "6TB"
# are refused rather than guessed.  Pure: needs no nixpkgs.
let
  units = {
    "" = 1;
    K = 1024;
    M = 1024 * 1024;
    G = 1024 * 1024 * 1024;
    T = 1024 * 1024 * 1024 * 1024;
  };
  parse =
    text:
    let
      m = builtins.match "[[:space:]]*([0-9]+)[[:space:]]*([KMGT]?)(iB)?[[:space:]]*" text;
    in
    if m == null || (builtins.elemAt m 1 == "" && builtins.elemAt m 2 != null) then
      null
    else
      {
        number = builtins.fromJSON (builtins.elemAt m 0);
        unit = builtins.elemAt m 1;
      };
in
rec {
  # Bytes of a size string, or null when it is not one.
  bytes =
    text:
    let
      p = parse text;
    in
    if p == null then null else p.number * units.${p.unit};

  # The VM's memory in MiB from an integer (MiB) or a string like "6GiB"; at least 1024.
  memoryMiB =
    value:
    let
      fail = why: throw "services.virby.memory: ${why}";
      mib =
        if builtins.isInt value then
          value
        else if builtins.isString value then
          let
            p = parse value;
            b = bytes value;
          in
          if p == null then
            fail "${builtins.toJSON value} is not a size like \"6GiB\" or \"4096MiB\""
          else if p.unit == "" then
            p.number
          else if b / 1048576 * 1048576 != b then
            fail "${value} is not a whole number of MiB"
          else
            b / 1048576
        else
          fail "expected an integer (MiB) or a string like \"6GiB\"";
    in
    if mib < 1024 then fail "${toString mib} MiB is less than the 1024 MiB the VM needs" else mib;

  # A disk size string, checked.
  diskSize =
    text:
    let
      b = bytes text;
    in
    if b == null then
      throw "services.virby.diskSize: ${builtins.toJSON text} is not a size like \"100GiB\""
    else if b < 1073741824 then
      throw "services.virby.diskSize: ${text} is smaller than 1GiB"
    else
      text;
}
