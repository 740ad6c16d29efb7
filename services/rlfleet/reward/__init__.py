"""Reward service: verifiers score finished trajectories; scored samples go to the buffer.

Entry: ``python -m rlfleet.reward``. Logic: ``core.RewardCore``; verifiers:
``verifiers.setup_verifier``.
"""
