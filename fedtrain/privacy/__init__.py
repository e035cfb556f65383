"""Privacy, on the client's side of the guarantee, shared by clients and server.

ledger.py        what was spent: one entry per mechanism run (DP-SGD rounds, metric releases)
accountants.py   epsilon of a list of entries (Opacus's PRV and RDP accountants)
calibration.py   delta rule, noise for a target epsilon, a run's plan (training + metrics)
policy.py        the client's own policy: what a run may ask of this client's data
fingerprint.py   a shard's identity and its records' digests (which data a ledger covers)
lifetime.py      the client's sealed lifetime ledger: every run over a shard composes
releases.py      metrics computed on private data, released through a Gaussian mechanism
"""
