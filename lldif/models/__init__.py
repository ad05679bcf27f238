"""The LLDif model: one file per part (SPEC 3), assembled in lldif.py."""
