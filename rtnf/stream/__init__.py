"""Rig protocols: sources (LSL, ZeroMQ binary and CSV, Open Ephys' ZMQ Interface, replay of a
file, the in-process simulator), sinks (LSL outlets, ZeroMQ PUB, Bpod App port and pybpod UDP),
rtnf's ZeroMQ message format, the loop's output contract, the live simulator and a receiver of
rtnf's outputs."""
