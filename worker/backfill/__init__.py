"""Backfills: ``mmstream replay`` (bounded, resumable), offset/time ranges, ``mmstream archive``."""
