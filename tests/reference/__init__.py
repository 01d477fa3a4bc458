"""Plain reference implementations of token-compression methods, sharing no code with policyc."""
