# The Virby daemon and command, from pyproject.toml.
{
  lib,
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
  # The end-to-end tests need sshd, nix and real sockets; the sandbox has none of them.
  pytestFlagsArray = [ "tests/unit" ];

  # twistd finds plugins by scanning twisted/plugins and caches what it found; build the
  # cache now, since the daemon's user cannot write to the store.
  postInstall = ''
    PYTHONPATH=$out/${python3Packages.python.sitePackages}:$PYTHONPATH \
      ${python3Packages.python.interpreter} -c \
      'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
  '';

  meta = {
    description = "On-demand Linux builder VM for Nix on macOS, run by a Twisted daemon";
    license = lib.licenses.mit;
    mainProgram = "virby";
    platforms = lib.platforms.unix;
  };
}
