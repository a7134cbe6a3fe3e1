"""A vfkit emulator for Linux: the same command line and REST API, with a real sshd as the guest."""
