"""Rig protocols: LSL and ZeroMQ sources and sinks, and the simulated rig's streamer."""
