"""The control loop and the safety shield."""
