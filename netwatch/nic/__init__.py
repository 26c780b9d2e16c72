"""The reconciler's per-NIC half: the NIC controller, its state machine and its runtime records."""
