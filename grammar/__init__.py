"""The .tokpol grammar, shipped as package data (policyc.grammar)."""
