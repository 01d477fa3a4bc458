"""The standard library of .tokpol policies, shipped as package data (policyc.policies)."""
