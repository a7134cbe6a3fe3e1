# The module's sharedDirectories, checked as the daemon's loader checks its shared-dirs: a
# tag of letters, digits, ".", "_" or "-", of at most bounds.shareTagBytes bytes and not one
# of Virby's own; an absolute path without control characters or "," (vfkit splits its
# device options on commas), of at most bounds.pathBytes bytes; at most bounds.shares of
# them.  Pure: needs no nixpkgs.
let
  bounds = import ./bounds.nix;
  fail = why: throw "services.virby.sharedDirectories: ${why}";
  hex = n: builtins.substring n 1 "0123456789abcdef";
  # U+0001 to U+001F and U+007F; a Nix string cannot hold U+0000.
  controls = map (n: builtins.fromJSON "\"\\u00${hex (n / 16)}${hex (n - n / 16 * 16)}\"") (
    builtins.genList (n: n + 1) 31 ++ [ 127 ]
  );
  hasControl = text: builtins.replaceStrings controls (map (_: "") controls) text != text;

  checkTag =
    tag:
    if builtins.match "[A-Za-z0-9_.-]+" tag == null then
      fail "tag ${builtins.toJSON tag} must be letters, digits, '.', '_' or '-'"
    else if builtins.stringLength tag > bounds.shareTagBytes then
      fail "tag \"${tag}\" is ${toString (builtins.stringLength tag)} bytes long; Virtualization.framework allows at most ${toString bounds.shareTagBytes}"
    else if builtins.elem tag bounds.reservedTags then
      fail "tag \"${tag}\" is reserved by Virby"
    else
      tag;

  checkPath =
    tag: path:
    let
      wrong = why: fail "tag \"${tag}\": ${builtins.toJSON path} ${why}";
    in
    if hasControl path then
      wrong "contains a control character"
    else if builtins.stringLength path > bounds.pathBytes then
      wrong "is ${toString (builtins.stringLength path)} bytes long; at most ${toString bounds.pathBytes} are allowed"
    else if builtins.substring 0 1 path != "/" then
      wrong "is not an absolute path"
    else if builtins.match ".*,.*" path != null then
      wrong "contains ',', which vfkit cannot take in a path"
    else
      path;
in
dirs:
let
  count = builtins.length (builtins.attrNames dirs);
in
if count > bounds.shares then
  fail "${toString count} shares; at most ${toString bounds.shares} are allowed"
else
  builtins.listToAttrs (
    map (tag: {
      name = checkTag tag;
      value = checkPath tag dirs.${tag};
    }) (builtins.attrNames dirs)
  )
