"""
A whole Virby on this Linux machine, with real processes: a prepared working directory, the
daemon, the vfkit emulator with a real sshd as its guest, ssh pointed at the daemon, and the
Nix configuration a fresh machine lacks.

Both the end-to-end tests (C{tests/e2e}) and the benchmarks (C{bench/}) drive Virby through
it, so a benchmark measures the setup the tests prove.  It lives beside them, not in the
C{virby} package: the wheel and the Nix package ship the daemon and the emulator, never this
(it reads C{/proc}, kills process groups, and starts daemons on free ports).
"""
