"""rtnf: real-time Neuroformer, closed-loop neural decoding for experiment rigs.

Layout (one job per sub-package): `config` (rtnf.yaml -> typed config), `data` (sessions, file
formats, the simulated rig), `tokens` (spikes <-> Neuroformer tokens), `stream` (rig protocols),
`cli` (the `rtnf` command).
"""

__version__ = "0.1.0"
