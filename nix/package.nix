# The Virby daemon and command, from pyproject.toml.
{
  lib,
  stdenv,
  python3Packages,
}:
python3Packages.buildPythonApplication {
  pname = "virby";
  version = "0.1.0";
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../LICENSE
      ../virby
      ../twisted
      ../tests
    ];
  };

  build-system = [ python3Packages.setuptools ];
  dependencies = with python3Packages; [
    twisted
    service-identity
    pyopenssl
    cryptography
  ];

  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    pytest-twisted
    hypothesis
  ];
  # The unit tests only: the end-to-end tests need sshd, nix and real processes that the
  # build sandbox does not have.  (nixpkgs' pytestCheckHook takes test paths here; flags
  # would go in pytestFlags.)
  enabledTestPaths = [ "tests/unit" ];
  # Tests of a Linux-only branch (splice(2), /proc, epoll) say so with the `linux` mark; a
  # Mac has none of it (dev/check-phase plays this check as strictly as a Mac runs it).
  disabledTestMarks = lib.optionals stdenv.hostPlatform.isDarwin [ "linux" ];
  # The unit tests listen on loopback ports, which Nix's darwin sandbox refuses without this.
  __darwinAllowLocalNetworking = true;

  # No twistd plugin cache is built here: Nix gives every file in the store the same mtime,
  # and twisted.plugin rebuilds a cache that is not newer than the plugin modules, so a
  # cache made now would be ignored at every start anyway.  twistd then scans the two
  # plugin modules itself (cheap), and its attempt to write dropin.cache into the read-only
  # store fails with a logged message and no other effect.

  meta = {
    description = "On-demand Linux builder VM for Nix on macOS, run by a Twisted daemon";
    license = lib.licenses.mit;
    mainProgram = "virby";
    platforms = lib.platforms.unix;
  };
}
