"""Sessions (`Session`), their file formats (npz, NWB, XDF) and the simulated rig."""

from rtnf.data.session import BehaviorChannel, Frames, GroundTruth, Session

__all__ = ["BehaviorChannel", "Frames", "GroundTruth", "Session"]
