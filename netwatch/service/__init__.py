"""The service shell: the daemon, the reconciler that routes events to NICs, the control
socket, hooks, the journal and systemd notify."""
