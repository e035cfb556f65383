"""`fedtrain audit`: an empirical lower bound on epsilon beside the accounted one (audit/run.py).

One simulated run with m canaries in one client's data, each included with probability 1/2; the
canaries are scored, the most confident guessed, and the correct guesses bound epsilon from below
with the theorem of Steinke, Nasr and Jagielski (NeurIPS 2023). A bound above the accounted epsilon
means the guarantee is broken.
"""

from fedtrain.audit.bound import epsilon_lower_bound, p_value
from fedtrain.audit.run import AuditResult, audit

__all__ = ["AuditResult", "audit", "epsilon_lower_bound", "p_value"]
