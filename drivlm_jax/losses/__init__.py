"""Losses: task (supervised heads + LM), and the DriVLM adaptation losses."""
