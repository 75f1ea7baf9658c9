"""Training (SPEC §1, §6): the tiny target, DDD/IDD drafts and the OSD proxy, one loop for all."""
