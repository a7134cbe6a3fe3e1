"""Virby: an on-demand Linux builder VM for Nix on macOS."""

__version__ = "0.1.0"
