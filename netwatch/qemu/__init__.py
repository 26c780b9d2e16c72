"""Everything that speaks to QEMU: the QMP session per VM, who its peer is, and the command-line arguments."""
