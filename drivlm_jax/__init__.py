"""drivlm-jax: DriVLM domain adaptation of compact driving VLMs, in JAX."""
