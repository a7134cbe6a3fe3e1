# Sizes as the daemon reads them (virby.config.parse_size): a whole number with an optional
# binary unit K, M, G or T, optionally followed by "iB" (or "B" alone, for bytes).  Decimal
# spellings such as "6TB" are refused rather than guessed.  The bounds are the daemon's
# (bounds.nix).  Pure: needs no nixpkgs.
let
  bounds = import ./bounds.nix;
  MiB = 1048576;
  GiB = 1073741824;
  TiB = 1099511627776;
  units = {
    "" = 1;
    K = 1024;
    M = MiB;
    G = GiB;
    T = TiB;
  };
  # Nix's integers have 64 bits: a number with more digits than this is beyond every bound,
  # and is refused as too large before it is converted.
  maxDigits = 18;
  largest = 9223372036854775807;

  # The number (null when it has too many digits to convert) and the unit of a size, or
  # null when the text is not a size.
  parse =
    text:
    let
      m = builtins.match "[[:space:]]*([0-9]+)[[:space:]]*([KMGT]?)(i?B)?[[:space:]]*" text;
      unit = builtins.elemAt m 1;
      suffix = builtins.elemAt m 2;
      significant = builtins.match "0*([1-9][0-9]*)" (builtins.elemAt m 0);
      digits = if significant == null then "0" else builtins.head significant;
    in
    if m == null || (suffix == "B" && unit != "") || (suffix == "iB" && unit == "") then
      null
    else
      {
        inherit unit;
        number = if builtins.stringLength digits > maxDigits then null else builtins.fromJSON digits;
      };

  # Whether a parsed size is more than `limit` bytes, without computing it.
  over = limit: p: p.number == null || p.number > limit / units.${p.unit};

  # "1GiB", "64TiB" or "1000 bytes", for messages.
  shownMiB = mib: shownBytes (mib * MiB);
  shownBytes =
    b:
    if b / TiB * TiB == b then
      "${toString (b / TiB)}TiB"
    else if b / GiB * GiB == b then
      "${toString (b / GiB)}GiB"
    else
      "${toString b} bytes";
in
{
  # Bytes of a size string, or null when it is not one (or is too large for Nix to hold).
  bytes =
    text:
    let
      p = parse text;
    in
    if p == null || over largest p then null else p.number * units.${p.unit};

  # The VM's memory in MiB from an integer (MiB), a string of one, or a size like "6GiB".
  memoryMiB =
    value:
    let
      fail = why: throw "services.virby.memory: ${why}";
      range = "between ${shownMiB bounds.memory.min} and ${shownMiB bounds.memory.max}";
      inRange =
        mib:
        if mib < bounds.memory.min then
          fail "${toString mib} MiB is less than the ${toString bounds.memory.min} MiB the VM needs"
        else if mib > bounds.memory.max then
          fail "${toString mib} MiB is more than ${shownMiB bounds.memory.max}"
        else
          mib;
      # As the daemon does: a whole number alone is MiB.
      integer = builtins.match "[[:space:]]*([+-]?)([0-9]+)[[:space:]]*" value;
      sign = if builtins.elemAt integer 0 == "-" then -1 else 1;
      written = builtins.elemAt integer 1;
      whole = if builtins.stringLength written > bounds.digits then null else (parse written).number;
      p = parse value;
    in
    if builtins.isInt value then
      inRange value
    else if !builtins.isString value then
      fail "expected an integer (MiB) or a string like \"6GiB\""
    else if integer != null then
      (if whole == null then fail "${value} MiB is not ${range}" else inRange (sign * whole))
    else if p == null then
      fail "${builtins.toJSON value} is not a size like \"6GiB\" or \"4096MiB\""
    else if over (bounds.memory.max * MiB) p then
      fail "${value} is more than ${shownMiB bounds.memory.max}"
    else
      let
        b = p.number * units.${p.unit};
      in
      if b / MiB * MiB != b then fail "${value} is not a whole number of MiB" else inRange (b / MiB);

  # A disk size string, checked.
  diskSize =
    text:
    let
      p = parse text;
      fail = why: throw "services.virby.diskSize: ${why}";
      range = "between ${shownBytes bounds.diskSize.min} and ${shownBytes bounds.diskSize.max}";
    in
    if p == null then
      fail "${builtins.toJSON text} is not a size like \"100GiB\""
    else if over bounds.diskSize.max p || p.number * units.${p.unit} < bounds.diskSize.min then
      fail "${text} is not ${range}"
    else
      text;
}
