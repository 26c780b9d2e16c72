"""netwatch: keep running QEMU VMs' network backends attached to their host links."""

__version__ = "0.1.0"
