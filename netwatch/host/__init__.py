"""Events from and actions on the host kernel: links (netlink), uevents, macvtap and tap
backends and their character devices."""
