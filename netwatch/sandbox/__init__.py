"""Apart from the service: the demo, the test guest, the test harness and frame streams."""
